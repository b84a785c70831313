"""graph.py is the one source of truth: the launch file's nodes/parameters and run_graph's commands must equal it."""
import ast
import importlib.util
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import yaml

from cmfiou_ros import graph
from cmfiou_ros.params import DETECTOR_PARAMS, REPLAY_PARAMS, validate
from cmfiou_ros.run_graph import node_command, write_overrides

REPO = Path(__file__).resolve().parents[1]
LAUNCH_FILE = REPO / "launch" / "kitti_replay.launch.py"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from rosutil import PIPELINE_FACTORY, fresh_domain  # noqa: E402

REAL_LAUNCH = importlib.util.find_spec("launch_ros") is not None and importlib.util.find_spec("launch") is not None


# ------------------------------------------------------------------ stub launch / launch_ros
class _Rec:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


class _LaunchConfiguration:
    def __init__(self, name):
        self.name = name

    def perform(self, context):
        return context.launch_configurations[self.name]


class _Context:
    def __init__(self, cfg):
        self.launch_configurations = cfg


def _stub_modules():
    launch = types.ModuleType("launch")
    launch.LaunchDescription = type("LaunchDescription", (_Rec,), {})
    actions = types.ModuleType("launch.actions")
    actions.DeclareLaunchArgument = type("DeclareLaunchArgument", (_Rec,), {})
    actions.OpaqueFunction = type("OpaqueFunction", (_Rec,), {})
    subs = types.ModuleType("launch.substitutions")
    subs.LaunchConfiguration = _LaunchConfiguration
    lr = types.ModuleType("launch_ros")
    lra = types.ModuleType("launch_ros.actions")
    lra.Node = type("Node", (_Rec,), {})
    return {"launch": launch, "launch.actions": actions, "launch.substitutions": subs, "launch_ros": lr,
            "launch_ros.actions": lra}


def _load_launch_with_stubs(monkeypatch):
    for name, mod in _stub_modules().items():
        monkeypatch.setitem(sys.modules, name, mod)
    spec = importlib.util.spec_from_file_location("kitti_replay_launch", LAUNCH_FILE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ARGSETS = [{}, {"data": "/d", "rate": "2.5", "use_sim_time": "true", "loop": "true", "checkpoint": "/c.pth",
                "config": "/m.yaml", "device": "cuda:0", "sync_policy": "approx", "rviz": "true"}]


@pytest.mark.parametrize("overrides", ARGSETS)
def test_launch_file_equals_graph(monkeypatch, overrides):
    if REAL_LAUNCH:
        pytest.skip("real launch installed: see test_launch_file_equals_graph_real_launch")
    mod = _load_launch_with_stubs(monkeypatch)
    ld = mod.generate_launch_description()
    entities = ld.args[0]
    declared = [e for e in entities if type(e).__name__ == "DeclareLaunchArgument"]
    assert [(d.args[0], d.kwargs["default_value"]) for d in declared] == [(n, d) for n, d, _ in graph.LAUNCH_ARGUMENTS]
    opaque = [e for e in entities if type(e).__name__ == "OpaqueFunction"]
    assert len(opaque) == 1
    cfg = dict(graph.DEFAULTS, **overrides)
    nodes = opaque[0].kwargs["function"](_Context(cfg))
    specs = graph.replay_graph({k: v for k, v in cfg.items() if k != "rviz"})
    ros_nodes = [n for n in nodes if n.kwargs["package"] == graph.PACKAGE]
    assert len(ros_nodes) == len(specs)
    for n, s in zip(ros_nodes, specs):
        assert n.kwargs["executable"] == s.executable and n.kwargs["name"] == s.name
        assert n.kwargs["parameters"] == [s.params_file, s.parameters]
        assert n.kwargs["remappings"] == s.remappings
    assert any(n.kwargs["package"] == "rviz2" for n in nodes) == (overrides.get("rviz") == "true")


@pytest.mark.skipif(not REAL_LAUNCH, reason="launch/launch_ros not installed (not on PyPI); stubs are used instead")
def test_launch_file_equals_graph_real_launch():
    from launch import LaunchContext
    from launch.actions import OpaqueFunction

    spec = importlib.util.spec_from_file_location("kitti_replay_launch", LAUNCH_FILE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ld = mod.generate_launch_description()
    ctx = LaunchContext()
    for name, default, _ in graph.LAUNCH_ARGUMENTS:
        ctx.launch_configurations[name] = default
    opaque = [e for e in ld.entities if isinstance(e, OpaqueFunction)][0]
    nodes = opaque.execute(ctx)
    specs = graph.replay_graph({k: v for k, v in graph.DEFAULTS.items() if k != "rviz"})
    assert [n.node_executable for n in nodes] == [s.executable for s in specs]
    assert [n.node_package for n in nodes] == [s.package for s in specs]


def test_launch_file_has_no_second_source_of_truth():
    """The launch file must not hard-code node names, executables, topics or parameters: all come from graph."""
    tree = ast.parse(LAUNCH_FILE.read_text())
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    forbidden = {s.name for s in graph.replay_graph()} | {s.executable for s in graph.replay_graph()} | \
        set(graph.TOPICS.values()) | {"cmfiou_ros"}
    assert not (strings & forbidden), strings & forbidden
    calls = {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    assert "replay_graph" in calls


def test_run_graph_command_equals_graph(tmp_path):
    for s in graph.replay_graph({"data": "/x", "rate": "3"}):
        ov = write_overrides(s, str(tmp_path))
        cmd = node_command(s, ov, "python")
        assert cmd[:3] == ["python", "-m", s.module]
        assert cmd[cmd.index("--ros-args") + 1:cmd.index("--ros-args") + 3] == ["-r", f"__node:={s.name}"]
        files = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--params-file"]
        assert files == [s.params_file, ov]
        assert yaml.safe_load(Path(ov).read_text()) == {s.name: {"ros__parameters": s.parameters}}
        remaps = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-r"][1:]
        assert remaps == [f"{a}:={b}" for a, b in s.remappings]


def test_config_files_match_parameter_tables():
    det = yaml.safe_load((REPO / "config/detector_node.yaml").read_text())["cmfiou_detector"]["ros__parameters"]
    rep = yaml.safe_load((REPO / "config/replay_node.yaml").read_text())["kitti_replay"]["ros__parameters"]
    validate(DETECTOR_PARAMS, det)  # unknown keys or bad values raise
    validate(REPLAY_PARAMS, rep)
    for s in graph.replay_graph():
        table = REPLAY_PARAMS if s.name == "kitti_replay" else DETECTOR_PARAMS
        validate(table, {k: v for k, v in s.parameters.items() if k != "use_sim_time"})


def _env(domain):
    env = dict(os.environ, ROS_DOMAIN_ID=str(domain))
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_run_graph_propagates_a_failing_node(tmp_path):
    p = subprocess.run([sys.executable, "-m", "cmfiou_ros.run_graph", f"data:={tmp_path / 'missing'}",
                        f"pipeline_factory:={PIPELINE_FACTORY}"], env=_env(fresh_domain()), cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "kitti_replay exited with" in p.stderr


def test_run_graph_sigint_tears_everything_down(kitti_samples, tmp_path):
    logs = tmp_path / "logs"
    proc = subprocess.Popen([sys.executable, "-m", "cmfiou_ros.run_graph", f"data:={kitti_samples / 'object'}",
                             "rate:=2", "loop:=true", f"pipeline_factory:={PIPELINE_FACTORY}", "--log-dir", str(logs)],
                            env=_env(fresh_domain()), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        t_end = time.monotonic() + 90
        while time.monotonic() < t_end:
            log = (logs / "cmfiou_detector.log")
            if log.is_file() and "configured" in log.read_text():
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=30)
        assert rc == 0
        out = proc.stdout.read()
        pids = [int(line.rsplit(" ", 1)[1]) for line in out.splitlines() if " started " in line and " pid " in line]
        assert len(pids) == 2, out
        for pid in pids:  # children are gone (reaped by run_graph)
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
