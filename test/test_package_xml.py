"""package.xml is exact: every third-party module the package imports (cmfiou_core/, cmfiou_ros/, the launch file) is
declared -- as a run-time dependency (exec_depend / depend) or in the documented pip list -- and nothing else is;
modules only the tests import are test_depend, never exec_depend."""
import ast
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# import name -> rosdep key, where they differ
ROSDEP_KEY = {"PIL": "python3-pil", "yaml": "python3-yaml", "numpy": "python3-numpy", "scipy": "python3-scipy",
              "tqdm": "python3-tqdm", "matplotlib": "python3-matplotlib", "tf2_ros": "tf2_ros_py",
              "shapely": "python3-shapely", "hypothesis": "python3-hypothesis", "pytest": "python3-pytest"}
BUILD_ONLY = {"rosidl_default_runtime"}  # generated interface code at run time, never imported by name


def _imports(paths):
    out = set()
    for p in paths:
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.Import):
                out |= {a.name.split(".")[0] for a in n.names}
            elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
                out.add(n.module.split(".")[0])
    return {m for m in out if m not in sys.stdlib_module_names and m not in ("cmfiou_core", "cmfiou_ros")}


def _package():
    root = ET.parse(REPO / "package.xml").getroot()
    tags = {}
    for el in root:
        if isinstance(el.tag, str):
            tags.setdefault(el.tag, set()).add(el.text.strip())
    text = (REPO / "package.xml").read_text()
    pip = set(re.search(r"^\s*pip:((?: [\w.-]+)+)\s*$", text, re.M).group(1).split())
    return tags, pip


def test_runtime_imports_equal_declared_dependencies():
    code = list((REPO / "cmfiou_core").rglob("*.py")) + list((REPO / "cmfiou_ros").rglob("*.py")) + \
        [REPO / "launch" / "kitti_replay.launch.py"]
    used = {ROSDEP_KEY.get(m, m) for m in _imports(code)}
    tags, pip = _package()
    declared = (tags.get("exec_depend", set()) | tags.get("depend", set())) - BUILD_ONLY
    assert used - pip == declared, {"imported, not declared": sorted(used - pip - declared),
                                    "declared, not imported": sorted(declared - (used - pip))}
    assert pip <= used, sorted(pip - used)
    assert {"torch", "spconv", "rosbags", "triton"} == pip


def test_test_only_imports_are_test_depend():
    tags, _ = _package()
    code = list((REPO / "cmfiou_core").rglob("*.py")) + list((REPO / "cmfiou_ros").rglob("*.py"))
    runtime = {ROSDEP_KEY.get(m, m) for m in _imports(code)}
    tests = {ROSDEP_KEY.get(m, m) for m in _imports((REPO / "test").glob("*.py"))}
    for key in ("cv_bridge", "sensor_msgs_py"):
        assert key not in runtime and key in tests | {key}
        assert key in tags["test_depend"] and key not in tags.get("exec_depend", set())
    for key in ("python3-pytest", "python3-hypothesis", "python3-shapely"):
        assert key in tests and key in tags["test_depend"]


def test_compat_vision_msgs_is_the_documented_subset():
    """compat/vision_msgs is described as a subset of vision_msgs 4.1.1 (README): exactly these 13 messages; the
    other three upstream ones are named as missing."""
    subset = {"BoundingBox2D", "BoundingBox3D", "BoundingBox3DArray", "Detection2D", "Detection2DArray", "Detection3D",
              "Detection3DArray", "LabelInfo", "ObjectHypothesis", "ObjectHypothesisWithPose", "Point2D", "Pose2D",
              "VisionClass"}
    assert {p.stem for p in (REPO / "compat/vision_msgs/msg").glob("*.msg")} == subset
    readme = (REPO / "README.md").read_text()
    assert "13 of its 16 messages" in readme
    for missing in ("BoundingBox2DArray", "Classification", "VisionInfo"):
        assert missing in readme
