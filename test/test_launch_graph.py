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
    actions.RegisterEventHandler = type("RegisterEventHandler", (_Rec,), {})
    actions.Shutdown = type("Shutdown", (_Rec,), {})
    handlers = types.ModuleType("launch.event_handlers")
    handlers.OnProcessExit = type("OnProcessExit", (_Rec,), {})
    subs = types.ModuleType("launch.substitutions")
    subs.LaunchConfiguration = _LaunchConfiguration
    lr = types.ModuleType("launch_ros")
    lra = types.ModuleType("launch_ros.actions")
    lra.Node = type("Node", (_Rec,), {})
    return {"launch": launch, "launch.actions": actions, "launch.event_handlers": handlers,
            "launch.substitutions": subs, "launch_ros": lr, "launch_ros.actions": lra}


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
    node_actions = [n for n in nodes if type(n).__name__ == "Node"]
    ros_nodes = [n for n in node_actions if n.kwargs["package"] == graph.PACKAGE]
    assert len(ros_nodes) == len(specs)
    for n, s in zip(ros_nodes, specs):
        assert n.kwargs["executable"] == s.executable and n.kwargs["name"] == s.name
        assert n.kwargs["parameters"] == [s.params_file, s.parameters]
        assert n.kwargs["remappings"] == s.remappings
    assert any(n.kwargs["package"] == "rviz2" for n in node_actions) == (overrides.get("rviz") == "true")
    # every graph node has an exit handler (run_graph's semantics: any node exiting ends the graph)
    handlers = [n.args[0] for n in nodes if type(n).__name__ == "RegisterEventHandler"]
    assert sorted(id(h.kwargs["target_action"]) for h in handlers) == sorted(id(n) for n in ros_nodes)
    assert all(h.kwargs["on_exit"] is mod.on_node_exit for h in handlers)


def test_launch_node_exit_semantics(monkeypatch):
    """A node exiting with an error makes the launch fail (the raise becomes launch's exit code 1); a clean exit
    (the replay after exit_on_end) shuts the launch down."""
    mod = _load_launch_with_stubs(monkeypatch) if not REAL_LAUNCH else _load_launch_real()
    ev = types.SimpleNamespace(action=types.SimpleNamespace(name="cmfiou_detector-2"), returncode=2)
    with pytest.raises(RuntimeError, match="cmfiou_detector-2 died with exit code 2"):
        mod.on_node_exit(ev, None)
    ev.returncode = -9
    with pytest.raises(RuntimeError, match="exit code -9"):
        mod.on_node_exit(ev, None)
    ev.returncode = 0
    out = mod.on_node_exit(ev, None)
    assert len(out) == 1 and type(out[0]).__name__ == "Shutdown"


def _load_launch_real():
    spec = importlib.util.spec_from_file_location("kitti_replay_launch", LAUNCH_FILE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not REAL_LAUNCH, reason="launch/launch_ros not installed (not on PyPI); stubs are used instead")
@pytest.mark.parametrize("overrides", ARGSETS)
def test_launch_file_equals_graph_real_launch(overrides):
    """With the real launch_ros: names, executables, parameters (files and the generated override file) and
    remappings of each Node after launch's own substitution equal graph.replay_graph's."""
    from launch import LaunchContext
    from launch.actions import OpaqueFunction
    from launch_ros.actions import Node

    mod = _load_launch_real()
    ld = mod.generate_launch_description()
    ctx = LaunchContext()
    cfg = dict(graph.DEFAULTS, **overrides)
    ctx.launch_configurations.update(cfg)
    opaque = [e for e in ld.entities if isinstance(e, OpaqueFunction)][0]
    nodes = [n for n in opaque.execute(ctx) if isinstance(n, Node) and n.node_package == graph.PACKAGE]
    specs = graph.replay_graph({k: v for k, v in cfg.items() if k != "rviz"})
    assert [n.node_executable for n in nodes] == [s.executable for s in specs]
    for n, s in zip(nodes, specs):
        n._perform_substitutions(ctx)
        assert n.node_name.rsplit("/", 1)[-1] == s.name  # (namespace placeholder before execute)
        assert [tuple(r) for r in n.expanded_remapping_rules or []] == s.remappings
        files = [p for p, is_file in n._Node__expanded_parameter_arguments if is_file]
        assert files[0] == s.params_file
        generated = yaml.safe_load(Path(files[1]).read_text())
        assert list(generated.values())[0]["ros__parameters"] == s.parameters


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
        out = proc.stdout.read()
        assert rc == 0, out + "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in logs.glob("*.log"))
        pids = [int(line.rsplit(" ", 1)[1]) for line in out.splitlines() if " started " in line and " pid " in line]
        assert len(pids) == 2, out
        for pid in pids:  # children are gone (reaped by run_graph)
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
