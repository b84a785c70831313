"""``--help`` of every executable and ``python -m`` module prints its usage and exits 0 -- nothing starts (no rclpy
context, no subprocess, no model): the node executables used to ignore it and start (detector) or fail (replay)."""
import ast
import importlib
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _main_modules():
    out = []
    for pkg in ("cmfiou_core", "cmfiou_ros"):
        for p in sorted((REPO / pkg).rglob("*.py")):
            tree = ast.parse(p.read_text())
            if any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body):
                out.append(".".join(p.relative_to(REPO).with_suffix("").parts))
    return out


MODULES = _main_modules()


def test_every_console_script_is_a_main_module():
    import re

    scripts = re.findall(r'"cmfiou-[\w-]+=([\w.]+):main"', (REPO / "setup.py").read_text())
    assert scripts and set(scripts) <= set(MODULES)
    assert {"cmfiou_ros.detector_node", "cmfiou_ros.replay_node", "cmfiou_ros.run_graph"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_help_prints_usage_and_starts_nothing(module, monkeypatch, capsys):
    def refuse(*a, **k):
        raise AssertionError(f"{module} --help started something")

    mod = importlib.import_module(module)  # (importing may run helpers, e.g. ctypes' ldconfig; calling must not)
    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    try:
        import rclpy

        monkeypatch.setattr(rclpy, "init", refuse)
    except ImportError:
        pass
    try:
        rc = mod.main(["--help"])
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr().out
    assert rc in (0, None), (module, rc, out)
    assert out.startswith("usage:"), (module, out[:300])
    assert "cmfiou-create-infos" not in out  # a command that does not exist
