"""A real install: ``colcon build`` (no ``--symlink-install``) of this package into a temporary workspace, then, with
the source tree OFF the Python path, the installed executables: the console script ``cmfiou-gen-scenes`` makes a
scene, ``lib/cmfiou_ros/run_graph`` runs the launch file's graph with its defaults (the bundled demo checkpoint and
config, found in the install's share directory) through the installed node executables, and ``--help`` of the node
executables starts nothing.

"Off the path": a throw-away venv whose only site entry is the project venv's site-packages as a plain path (so its
``.pth`` files -- the editable install that puts the checkout on ``sys.path`` -- are not processed), the checkout not
on PYTHONPATH and not the working directory. Every import and resource must then come from the install.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from rosutil import missing, require  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
require("rclpy")
if shutil.which("colcon") is None and not (Path(sys.prefix) / "bin" / "colcon").is_file():
    missing("colcon is not installed (setup.sh installs it from requirements-ros.txt)")


def _setup_py_console_scripts():
    import ast

    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values):
                if isinstance(k, ast.Constant) and k.value == "console_scripts":
                    return dict(s.value.split("=", 1) for s in v.elts)
    raise AssertionError("no console_scripts in setup.py")


@pytest.fixture(scope="module")
def install(tmp_path_factory):
    ws = tmp_path_factory.mktemp("colcon_ws")
    (ws / "src").mkdir()
    (ws / "src" / "cmfiou_ros").symlink_to(REPO)  # the README: the clone sits in <ws>/src
    venv = ws / "venv"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(venv)],
                   check=True)
    site = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    site.mkdir(parents=True, exist_ok=True)
    (site / "cmfiou_project_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    py = venv / "bin" / "python"
    libs = [str(Path(sys.prefix) / "lib")] + [str(p) for p in Path(sysconfig.get_paths()["purelib"]).glob("ros_*.libs")]
    base_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CMFIOU_SHARE_DIR", "CMFIOU_ROOT")}
    base_env.update(
        PATH=os.pathsep.join([str(venv / "bin"), str(Path(sys.prefix) / "bin"), os.environ.get("PATH", "")]),
        AMENT_PREFIX_PATH=sys.prefix, CMAKE_PREFIX_PATH=sys.prefix,
        LD_LIBRARY_PATH=os.pathsep.join(libs + [os.environ.get("LD_LIBRARY_PATH", "")]),
        _ROS_WHEELS_BOOTSTRAP_COMPLETE="1",  # LD_LIBRARY_PATH set here (what the bootstrapper .pth would do)
        CMFIOU_DEMO_DATA=str(ws / "demo_cache"), OMP_NUM_THREADS="1")
    colcon = shutil.which("colcon", path=base_env["PATH"])
    r = subprocess.run([colcon, "build", "--packages-select", "cmfiou_ros", "--cmake-args",
                        f"-DPython3_EXECUTABLE={py}", "-DBUILD_TESTING=OFF"], cwd=ws, env=base_env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    # the environment of `source install/setup.bash`
    dump = subprocess.run(["bash", "-c", "source install/setup.bash && env -0"], cwd=ws, env=base_env,
                          capture_output=True, timeout=60, check=True).stdout
    env = dict(kv.split("=", 1) for kv in dump.decode().split("\0") if "=" in kv)
    return ws, env


def _run(cmd, ws, env, timeout=300, **kw):
    return subprocess.run(cmd, cwd=ws / "run", env=env, capture_output=True, text=True, timeout=timeout, **kw)


def test_installed_layout(install):
    ws, env = install
    prefix = ws / "install" / "cmfiou_ros"
    share = prefix / "share" / "cmfiou_ros"
    for rel in ("config/cmfiou_kitti.yaml", "config/cmfiou_kitti_official.yaml", "config/detector_node.yaml",
                "config/replay_node.yaml", "config/fastdds_shm.xml", "launch/kitti_replay.launch.py",
                "models/cmfiou_synthetic_demo_fp16.pt", "msg/DetectionScores.msg",
                "compat/vision_msgs/msg/Detection3DArray.msg", "package.xml"):
        p = share / rel
        assert p.is_file() and not p.is_symlink(), rel
    assert (share / "models/cmfiou_synthetic_demo_fp16.pt").stat().st_size == \
        (REPO / "models/cmfiou_synthetic_demo_fp16.pt").stat().st_size
    scripts = _setup_py_console_scripts()
    assert sorted(p.name for p in (prefix / "bin").iterdir()) == sorted(scripts)
    for name, target in scripts.items():
        module = target.split(":")[0]
        assert f"from {module} import main" in (prefix / "bin" / name).read_text()
    assert sorted(p.name for p in (prefix / "lib" / "cmfiou_ros").iterdir()) == \
        ["detector_node", "kitti_replay_node", "run_graph"]
    assert str(prefix / "bin") in env["PATH"].split(os.pathsep)[:3]


def test_imports_and_resources_come_from_the_install(install):
    ws, env = install
    (ws / "run").mkdir(exist_ok=True)
    code = ("import cmfiou_core, cmfiou_ros, cmfiou_ros.detector_node, cmfiou_ros.msg, sys\n"
            "from cmfiou_core import resources, pipeline\n"
            "print(cmfiou_core.__file__); print(cmfiou_ros.detector_node.__file__); print(cmfiou_ros.msg.__file__)\n"
            "print(pipeline.demo_checkpoint()); print(pipeline.default_config()); print(resources.msg_dir('cmfiou_ros'))\n"
            f"assert not [p for p in sys.path if (p + '/').startswith({str(REPO) + '/'!r}) and not "
            f"p.startswith({sys.prefix!r})], sys.path\n")  # the checkout is not on the path (its venv may be)
    r = _run([str(ws / "venv" / "bin" / "python"), "-c", code], ws, env)
    assert r.returncode == 0, r.stderr
    inst = str(ws / "install")
    for line in r.stdout.split():
        assert line.startswith(inst), r.stdout


def test_help_of_installed_executables_starts_nothing(install):
    ws, env = install
    (ws / "run").mkdir(exist_ok=True)
    lib = ws / "install" / "cmfiou_ros" / "lib" / "cmfiou_ros"
    for exe, needle in (("detector_node", "pipeline_factory"), ("kitti_replay_node", "data_dir"),
                        ("run_graph", "exit_on_end")):
        r = _run([str(lib / exe), "--help"], ws, env, timeout=60)
        assert r.returncode == 0 and "usage:" in r.stdout and needle in r.stdout, (exe, r.stdout, r.stderr)
        assert "pipeline loaded" not in r.stdout + r.stderr and "replaying" not in r.stdout + r.stderr


def test_console_script_and_graph_with_defaults(install):
    """cmfiou-gen-scenes (console script) writes a scene; the graph with its defaults (demo checkpoint, default config,
    lockstep) runs it through the installed executables, prints the frame's detections and ends cleanly after the
    detector answered (exit_on_end)."""
    ws, env = install
    (ws / "run").mkdir(exist_ok=True)
    data = ws / "scenes"
    r = _run(["cmfiou-gen-scenes", "--out", str(data), "--num", "1", "--seed", "5"], ws, env)
    assert r.returncode == 0, r.stderr
    assert (data / "training" / "velodyne" / "000000.bin").is_file()
    r = _run([str(ws / "install" / "cmfiou_ros" / "lib" / "cmfiou_ros" / "run_graph"), f"data:={data}",
              "exit_on_end:=true"], ws, env, timeout=400)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    assert "[run_graph] kitti_replay finished" in out and "every node exited cleanly" in out, out[-5000:]
    assert str(ws / "install" / "cmfiou_ros" / "share" / "cmfiou_ros" / "models") in out, out[-5000:]  # demo ckpt
    assert "frame 1 (000000): " in out and " detection" in out, out[-5000:]
    assert "1 frames published, 1 outputs, 0 dropped" in out, out[-5000:]
    assert "Traceback" not in out, out[-5000:]


REAL_LAUNCH = all(importlib.util.find_spec(m) is not None for m in ("launch", "launch_ros"))
LAUNCH_RUNNER = """
import sys
from launch import LaunchService
from launch.actions import IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource
from ament_index_python.packages import get_package_share_directory
ls = LaunchService()
path = get_package_share_directory("cmfiou_ros") + "/launch/kitti_replay.launch.py"
args = dict(a.split(":=", 1) for a in sys.argv[1:])
ls.include_launch_description(IncludeLaunchDescription(PythonLaunchDescriptionSource(path), launch_arguments=args.items()))
sys.exit(ls.run())
"""


def _launch_env(env):
    """The install's environment plus the importable launch / launch_ros (on PYTHONPATH in a ROS installation)."""
    roots = [str(Path(importlib.util.find_spec(m).origin).parent.parent) for m in ("launch", "launch_ros")]
    extra = [str(Path(importlib.util.find_spec("composition_interfaces").origin).parent.parent)] \
        if importlib.util.find_spec("composition_interfaces") else []
    return dict(env, PYTHONPATH=os.pathsep.join([env.get("PYTHONPATH", "")] + roots + extra))


@pytest.mark.skipif(not REAL_LAUNCH, reason="launch/launch_ros not installed (not on PyPI)")
def test_real_launch_semantics(install, kitti_samples):
    """The installed launch file under the real launch service: a dying node ends it with an error, exit_on_end ends
    it cleanly after the detector answered the last frame, Ctrl-C (SIGINT to the process group) ends it cleanly."""
    import signal
    import time

    ws, env = install
    (ws / "run").mkdir(exist_ok=True)
    env = _launch_env(env)
    py = str(ws / "venv" / "bin" / "python")
    tiny = f"pipeline_factory:={REPO / 'test' / 'tiny_pipeline.py'}:TinyPipeline.from_config"
    r = _run([py, "-c", LAUNCH_RUNNER, f"data:={ws / 'missing'}", tiny], ws, env, timeout=120)
    assert r.returncode != 0 and "died with exit code 2" in r.stdout + r.stderr, (r.stdout + r.stderr)[-4000:]
    r = _run([py, "-c", LAUNCH_RUNNER, f"data:={kitti_samples / 'object'}", "max_frames:=2", "exit_on_end:=true",
              tiny], ws, env, timeout=180)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "2 frames published, 2 outputs, 0 dropped" in out and "Traceback" not in out, out[-4000:]
    p = subprocess.Popen([py, "-c", LAUNCH_RUNNER, f"data:={kitti_samples / 'object'}", "loop:=true", tiny],
                         cwd=ws / "run", env=dict(env, CMFIOU_TINY_SLEEP_MS="800"), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        t_end = time.monotonic() + 90
        buf = ""
        while time.monotonic() < t_end and buf.count(" detections: ") < 2:
            line = p.stdout.readline()
            assert line or p.poll() is None, buf[-4000:]
            buf += line
        os.killpg(p.pid, signal.SIGINT)  # the terminal's Ctrl-C: launch and both nodes
        rest, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    out = buf + rest
    assert p.returncode == 0, out[-4000:]
    for bad in ("Traceback", "KeyboardInterrupt", "process has died"):
        assert bad not in out, out[-4000:]
    assert "shutdown (SIGINT)" in out, out[-4000:]
