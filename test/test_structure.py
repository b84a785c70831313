"""The package's import graph has no circle (module-level and function-level imports alike: a late import inside a
function only hides a circle, it does not remove it), and no module finds a path beside its own source file."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("cmfiou_core", "cmfiou_ros")


def _modules():
    """{dotted name: (file, is_package)} for every module of the packages."""
    mods = {}
    for pkg in PACKAGES:
        for f in sorted((REPO / pkg).rglob("*.py")):
            parts = list(f.relative_to(REPO).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            mods[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return mods


def import_graph():
    """{module: set of the package modules it imports anywhere in its body}."""
    mods = _modules()
    graph = {}
    for name, (path, is_pkg) in mods.items():
        base = name.split(".") if is_pkg else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level:
                    mod = ".".join(base[:len(base) - node.level + 1] + ([mod] if mod else []))
                targets.add(mod)
                targets.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import submodule`
        deps = set()
        for t in targets:
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t and t != name:
                deps.add(t)
        graph[name] = deps
    return graph


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_circle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(g) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_graph_sees_relative_and_late_imports():
    g = import_graph()
    # pipeline.py imports ``.depth.pseudo`` at module level; reference.py imports ``.pseudo``
    assert "cmfiou_core.depth.pseudo" in g["cmfiou_core.pipeline"]
    assert "cmfiou_core.depth.pseudo" in g["cmfiou_core.depth.reference"]
    # a late import inside a function counts: eval/dataset_eval.py imports the pipeline inside make_eval_fn
    assert "cmfiou_core.pipeline" in g["cmfiou_core.eval.dataset_eval"]


def test_no_import_circle():
    assert cycles(import_graph()) == []


def test_core_never_imports_ros():
    g = import_graph()
    bad = {m: sorted(d for d in deps if d.startswith("cmfiou_ros")) for m, deps in g.items()
           if m.startswith("cmfiou_core")}
    assert not {m: d for m, d in bad.items() if d}


def test_production_code_never_imports_the_frozen_depth_reference():
    g = import_graph()
    assert [m for m, deps in g.items() if "cmfiou_core.depth.reference" in deps] == []


# Modules that may use ``__file__``, and why: neither finds a resource (configs, checkpoints, .msg files are found
# through cmfiou_core.resources, which works in a colcon install where the code and the resources live apart).
FILE_RELATIVE_OK = {
    "cmfiou_core.provenance": "the git checkout the code itself runs from (its commit goes into results files)",
    "cmfiou_core.opcount": "names the package's own source lines that issued a counted op",
}


def uses_of_file(path: Path):
    """Line numbers where the module at ``path`` reads ``__file__``."""
    return [n.lineno for n in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(n, ast.Name) and n.id == "__file__"]


def test_file_finder_sees_a_path_beside_the_source(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from pathlib import Path\n\ndef cfg():\n    return Path(__file__).parents[1] / 'config'\n")
    assert uses_of_file(f) == [4]


def test_no_path_beside_a_source_file():
    found = {name: uses_of_file(path) for name, (path, _) in _modules().items()}
    bad = {name: lines for name, lines in found.items() if lines and name not in FILE_RELATIVE_OK}
    assert not bad, f"paths resolved beside a source file (use cmfiou_core.resources): {bad}"
    assert all(found[name] for name in FILE_RELATIVE_OK), "an allowed use is gone: drop it from FILE_RELATIVE_OK"


def test_provenance_git_state_is_the_checkout_of_the_code_only(tmp_path):
    """provenance's use of ``__file__``: the commit of the checkout whose top holds the code; code installed inside
    some other repository (a folder below its top) records no commit instead of that repository's."""
    import subprocess

    from cmfiou_core.provenance import git_state

    repo, sub = tmp_path / "repo", tmp_path / "repo" / "install" / "site-packages"
    sub.mkdir(parents=True)
    (repo / "f.txt").write_text("x\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    for args in (["init", "-q"], ["add", "f.txt"], ["commit", "-q", "-m", "one"]):
        subprocess.run(git + args, check=True, capture_output=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert git_state(repo) == {"git_commit": head, "git_dirty": False}
    below = git_state(sub)
    assert below["git_commit"] is None and "is not the top of a git checkout" in below["git_error"], below
    (tmp_path / "plain").mkdir()
    assert git_state(tmp_path / "plain")["git_commit"] is None


def test_load_factory_module_file_and_errors(tmp_path):
    """One pipeline-factory loader (cmfiou_core.factory) for the node parameter and bag-eval's flag."""
    import pytest

    from cmfiou_core.factory import load_factory
    from cmfiou_core.pipeline import Pipeline

    assert load_factory("cmfiou_core.pipeline:Pipeline.from_config") == Pipeline.from_config
    f = tmp_path / "fac.py"
    f.write_text("class P:\n    @classmethod\n    def make(cls):\n        return 42\nNOT = 1\n")
    assert load_factory(f"{f}:P.make")() == 42
    with pytest.raises(KeyError, match="pipeline_factory"):
        load_factory(f"{f}:NOT", error=KeyError)
    with pytest.raises(ValueError, match="--pipeline-factory 'nocolon': expected 'module:attr'"):
        load_factory("nocolon", "--pipeline-factory")
    with pytest.raises(ValueError, match="not found"):
        load_factory(f"{tmp_path / 'missing.py'}:x")
