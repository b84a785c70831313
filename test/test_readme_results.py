"""README numbers and their results files.

Every results file in ``docs/results/`` the README names must carry a complete provenance record (git commit, config
SHA-256, checkpoint SHA-256, device, command: ``cmfiou_core/provenance.py``), the README may not quote a file that
was moved to ``docs/results/archive/`` (historical, no provenance) nor one that does not exist, and the numbers of
the README's AP tables (and a few named AP sentences) must be the ones in the JSON file each names. Pure file
parsing: no model runs (seconds)."""
import itertools
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
RESULTS = REPO / "docs" / "results"
ARCHIVE = RESULTS / "archive"
HEX40 = re.compile(r"^[0-9a-f]{40}$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")

# Older GPU speed files still quoted by the README's speed section, which its owner is replacing with measurements
# that carry provenance. Nothing may be added here; an entry goes (and its file to archive/) once the README stops
# quoting it.
LEGACY_SPEED_FILES: set = set()   # every file the README quotes now carries provenance

_NAME = re.compile(r"[A-Za-z0-9_*{},.\-]+\.(?:(?:json|jsonl|md)\b|\{(?:json|jsonl|md)(?:,(?:json|jsonl|md))*\})")


def expand(pattern: str):
    """Brace expansion (``a_{x,y}.{json,md}``) and globs against docs/results/ (top level and archive/)."""
    parts = re.split(r"(\{[^{}]*\})", pattern)
    choices = [p[1:-1].split(",") if p.startswith("{") else [p] for p in parts]
    for combo in itertools.product(*choices):
        name = "".join(combo)
        if "*" in name:
            for d in (RESULTS, ARCHIVE):
                yield from sorted(p.name for p in d.glob(name) if p.is_file())
        else:
            yield name


def readme_result_names(text: str):
    """{file name: first README line naming it} for every name that resolves to a file in docs/results/ (or its
    archive/), or that is written with a docs/results/ prefix."""
    out = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        for m in _NAME.finditer(line):
            raw = m.group(0).strip(".,")
            if raw == "README.md" and line[:m.start()].endswith("archive/"):  # the archive's own README
                continue
            prefixed = line[max(0, m.start() - 13):m.start()].endswith("docs/results/")
            for name in expand(Path(raw).name if "/" in raw else raw):
                if prefixed or (RESULTS / name).is_file() or (ARCHIVE / name).is_file():
                    out.setdefault(name, lineno)
    return out


def missing_provenance(report) -> list:
    """The provenance fields a results JSON lacks (empty: complete)."""
    p = report.get("provenance") if isinstance(report, dict) else None
    if not isinstance(p, dict):
        return ["provenance"]
    bad = []
    if not HEX40.match(str(p.get("git_commit"))):
        bad.append("git_commit")
    # a measurement without any model (a generator speed, ground truth fed back) records config and checkpoint as
    # None, as provenance(resolve_default_checkpoint=False) writes it; a model run always names its config
    no_model = all(p.get(k) is None for k in ("config", "config_sha256", "checkpoint", "checkpoint_sha256"))
    if not no_model and not HEX64.match(str(p.get("config_sha256"))):
        bad.append("config_sha256")
    # random weights (--checkpoint none) have no file to hash; anything else must be hashed
    random_weights = p.get("checkpoint") is None and re.search(r"--checkpoint[ =](none|'none')\b|--random-weights\b",
                                                                str(p.get("command")))
    if not no_model and not HEX64.match(str(p.get("checkpoint_sha256"))) and not random_weights:
        bad.append("checkpoint_sha256")
    if not (p.get("device") or p.get("device_name")):
        bad.append("device")
    if not str(p.get("command") or "").strip():
        bad.append("command")
    return bad


def test_missing_provenance_detects_each_gap():
    good = {"provenance": {"git_commit": "a" * 40, "config_sha256": "b" * 64, "checkpoint": "/m.pt",
                           "checkpoint_sha256": "c" * 64, "device": "cpu", "command": "python -m x"}}
    assert missing_provenance(good) == []
    assert missing_provenance({"ap": {}}) == ["provenance"]
    for key in ("git_commit", "config_sha256", "checkpoint_sha256", "device", "command"):
        bad = json.loads(json.dumps(good))
        bad["provenance"][key] = None
        if key == "device":
            bad["provenance"]["device_name"] = None
        assert missing_provenance(bad) == [key]
    rnd = json.loads(json.dumps(good))
    rnd["provenance"].update(checkpoint=None, checkpoint_sha256=None, command="python bench/x.py --checkpoint none")
    assert missing_provenance(rnd) == []
    nomodel = json.loads(json.dumps(good))
    nomodel["provenance"].update(config=None, config_sha256=None, checkpoint=None, checkpoint_sha256=None,
                                 device=None, device_name="Intel(R) Xeon(R) Processor")
    assert missing_provenance(nomodel) == []
    nomodel["provenance"]["config"] = "config/x.yaml"  # a model ran: its hashes are required
    assert missing_provenance(nomodel) == ["config_sha256", "checkpoint_sha256"]


def test_expand_braces_and_globs():
    assert list(expand("kitti13_{evaluate,bag_node}.json")) == ["kitti13_evaluate.json", "kitti13_bag_node.json"]
    assert list(expand("a_{1,3}.{json,md}")) == ["a_1.json", "a_1.md", "a_3.json", "a_3.md"]
    assert _NAME.findall("see `b_{eager,graph}_h200.{json,md}`, x.json.") == ["b_{eager,graph}_h200.{json,md}",
                                                                              "x.json"]


@pytest.fixture(scope="module")
def readme():
    return README.read_text(encoding="utf-8")


def test_readme_results_files_exist_carry_provenance_and_are_not_archived(readme):
    names = readme_result_names(readme)
    assert names, "the README names no results file"
    problems = []
    for name, line in sorted(names.items()):
        path = RESULTS / name
        if not path.is_file():
            where = "was moved to docs/results/archive/ (no provenance)" if (ARCHIVE / name).is_file() else \
                "does not exist"
            problems.append(f"README line {line}: {name} {where}")
            continue
        if name.endswith(".json") and name not in LEGACY_SPEED_FILES:
            bad = missing_provenance(json.loads(path.read_text()))
            if bad:
                problems.append(f"README line {line}: docs/results/{name} lacks provenance {bad}")
        elif name.endswith(".jsonl"):
            problems.append(f"README line {line}: {name} is a log without a provenance record")
    assert not problems, "\n".join(problems)


def test_every_top_level_results_json_has_provenance():
    """Files without provenance live in archive/ (or are the legacy speed files above)."""
    bad = {p.name: missing_provenance(json.loads(p.read_text())) for p in sorted(RESULTS.glob("*.json"))
           if p.name not in LEGACY_SPEED_FILES}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, bad


# ------------------------------------------------------------------------------------------ AP numbers vs JSON
_CLASS = {"car": "Car", "ped": "Pedestrian", "pedestrian": "Pedestrian", "cyc": "Cyclist", "cyclist": "Cyclist"}
_METRIC = {"3d": "3d", "bev": "bev", "aos": "aos", "2d": "bbox", "bbox": "bbox"}
_COL = re.compile(r"^(car|ped|pedestrian|cyc|cyclist)\s+(3d|bev|aos|2d|bbox)$", re.I)
_TRIPLE = re.compile(r"^(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)$")


def _cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def ap_table_rows(text: str):
    """(line number, json name, {(class, metric): (e, m, h)}) for every row of a README table whose header has
    AP columns ('Car 3D', 'Ped BEV', 'Car AOS', ...) and whose last column names a docs/results JSON."""
    lines = text.splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.startswith("|") or i + 1 >= len(lines) or not re.match(r"^\|[\s|:-]+\|$", lines[i + 1]):
            continue
        header = _cells(line)
        cols = {j: (_CLASS[m.group(1).lower()], _METRIC[m.group(2).lower()])
                for j, h in enumerate(header) for m in [_COL.match(h.replace("*", "").strip())] if m}
        if not cols or "json" not in header[-1].lower():
            continue
        objects = [j for j, h in enumerate(header) if "objects" in h.lower()]
        for k in range(i + 2, len(lines)):
            if not lines[k].startswith("|"):
                break
            cells = _cells(lines[k])
            names = re.findall(r"`([^`]+\.json)`", cells[-1])
            assert len(names) == 1, f"README line {k + 1}: the JSON column must name one file: {cells[-1]!r}"
            vals = {}
            for j, key in cols.items():
                m = _TRIPLE.match(cells[j].replace("*", "").strip())
                assert m, f"README line {k + 1}: column {header[j]!r} is not 'E / M / H': {cells[j]!r}"
                vals[key] = tuple(m.groups())
            for j in objects:  # 'Car / Ped / Cyc objects': the localization's ground-truth counts
                vals[("objects", None)] = tuple(x.strip() for x in cells[j].split("/"))
            rows.append((k + 1, names[0], vals))
    return rows


def _check_quoted(quoted: str, value: float, where: str):
    decimals = len(quoted.split(".")[1]) if "." in quoted else 0
    expect = f"{value:.{decimals}f}"
    assert quoted == expect, f"{where}: README says {quoted}, the JSON holds {value!r} ({expect})"


def test_ap_table_parser_reads_and_rejects():
    table = ("| setting | Car 3D | Ped BEV | JSON |\n|---|---|---|---|\n"
             "| 1 view | **97.4 / 95.7** / 90.5 | 1.0 / 2.0 / 3.0 | `x.json` |\n")
    assert ap_table_rows(table) == [(3, "x.json", {("Car", "3d"): ("97.4", "95.7", "90.5"),
                                                   ("Pedestrian", "bev"): ("1.0", "2.0", "3.0")})]
    with pytest.raises(AssertionError, match="not 'E / M / H'"):
        ap_table_rows(table.replace("1.0 / 2.0 / 3.0", "1.0 / 2.0"))
    with pytest.raises(AssertionError, match="says 95.7"):
        _check_quoted("95.7", 95.76, "x")
    _check_quoted("95.7", 95.70755879328942, "x")


def test_readme_ap_tables_match_their_json(readme):
    rows = ap_table_rows(readme)
    assert len(rows) >= 4, f"expected the generated-scene AP table (>= 4 rows), found {len(rows)}"
    for line, name, vals in rows:
        report = json.loads((RESULTS / name).read_text())
        r40 = report["ap"]["R40"]
        counts = vals.pop(("objects", None), None)
        if counts is not None:
            held = tuple(str(report["localization"][c]["num_gt"]) for c in ("Car", "Pedestrian", "Cyclist"))
            assert counts == held, f"README line {line}: objects {counts}, {name} holds {held}"
        for (cls, metric), triple in vals.items():
            for d, quoted in zip(("easy", "moderate", "hard"), triple):
                _check_quoted(quoted, r40[cls][metric][("easy", "moderate", "hard").index(d)],
                              f"README line {line}, {name} {cls} {metric} {d}")


# a few named AP sentences outside the tables: (regex with three groups of numbers, json, class, metric, R40 index)
_SENTENCES = [
    # the 13 real KITTI frames, three evaluation paths
    (r"Car 3D R40\s+(\d+\.\d+) / (\d+\.\d+) / (\d+\.\d+) on each path", "kitti13_evaluate.json", "Car", "3d", None),
    (r"Car 3D R40\s+(\d+\.\d+) / (\d+\.\d+) / (\d+\.\d+) on each path", "kitti13_bag_offline.json", "Car", "3d", None),
    (r"Car 3D R40\s+(\d+\.\d+) / (\d+\.\d+) / (\d+\.\d+) on each path", "kitti13_bag_node.json", "Car", "3d", None),
    # the bundled checkpoint in the introduction: Car / Ped / Cyc moderate, 1 view and 3 views
    (r"scores Car / Pedestrian / Cyclist 3D AP \(R40, moderate\)\s+(\d+\.\d+) / (\d+\.\d+) / (\d+\.\d+) with 1 view",
     "ap_demo_seed7_1view.json", None, "3d", 1),
    (r"with 1 view and (\d+\.\d+) / (\d+\.\d+) / (\d+\.\d+) with the official 3 views",
     "ap_demo_seed7_3views.json", None, "3d", 1),
    (r"(\d+\.\d+) / (\d+\.\d+) / (\d+\.\d+) with 1 view on 40 scenes of a seed never used in training",
     "ap_demo_seed2027_1view.json", None, "3d", 1),
]


@pytest.mark.parametrize("pattern,name,cls,metric,index", _SENTENCES)
def test_readme_named_ap_sentences_match_their_json(readme, pattern, name, cls, index, metric):
    flat = " ".join(readme.split())
    m = re.search(pattern, flat)
    assert m, f"README sentence not found: {pattern}"
    r40 = json.loads((RESULTS / name).read_text())["ap"]["R40"]
    if cls is not None:  # easy / moderate / hard of one class
        values = r40[cls][metric]
    else:  # one difficulty of Car / Pedestrian / Cyclist
        values = [r40[c][metric][index] for c in ("Car", "Pedestrian", "Cyclist")]
    for quoted, v in zip(m.groups(), values):
        _check_quoted(quoted, v, f"{name}: {pattern}")


def test_readme_intro_localization_matches_its_json(readme):
    """'N% of the M cars have a detection at 3D IoU >= 0.7, ...' in the introduction: the 1-view seed-7 JSON's
    localization recall and ground-truth counts."""
    flat = " ".join(readme.split())
    m = re.search(r"(\d+)% of the (\d+) cars have a detection at 3D IoU ≥ 0\.7, (\d+)% of the (\d+) pedestrians "
                  r"and (\d+)% of the (\d+) cyclists", flat)
    assert m, "the introduction's localization sentence is missing"
    loc = json.loads((RESULTS / "ap_demo_seed7_1view.json").read_text())["localization"]
    for (pct, n), cls in zip(zip(m.groups()[::2], m.groups()[1::2]), ("Car", "Pedestrian", "Cyclist")):
        assert int(n) == loc[cls]["num_gt"], (cls, n, loc[cls]["num_gt"])
        assert int(pct) == round(100 * loc[cls]["recall"]), (cls, pct, loc[cls]["recall"])


def test_readme_demo_checkpoint_training_record_matches_its_json(readme):
    flat = " ".join(readme.split())
    m = re.search(r"(\d+) iterations \((\d+) epochs of (\d+), batch (\d+), (\d+) skipped steps, (\d+) s of training\)",
                  flat)
    assert m, "the introduction's training record of the demo checkpoint is missing"
    ck = json.loads((RESULTS / "demo_checkpoint.json").read_text())
    assert not missing_provenance(ck)
    held = (ck["iterations"], ck["epochs"], ck["iters_per_epoch"], ck["batch_size"], ck["skipped_steps"],
            round(ck["time_used_s"]))
    assert tuple(int(x) for x in m.groups()) == held, (m.groups(), held)
