"""Ctrl-C and SIGTERM end every node cleanly -- alone, under a launch-like process group and under run_graph: exit 0,
no traceback, and the frame in flight at that moment either published or dropped and counted.

Real processes, real rclpy, the tiny pipeline slowed down (CMFIOU_TINY_SLEEP_MS) so that a frame is being inferred
when the signal arrives. The process-group case is what a terminal + ``ros2 launch`` do: the terminal's Ctrl-C reaches
every process of the group, then launch sends each node its own SIGINT (and SIGTERM after ``sigterm_timeout``).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rosutil import require  # noqa: E402  (pytest puts test/ on sys.path)
require("rclpy")

from cmfiou_ros import graph  # noqa: E402
from cmfiou_ros.run_graph import node_command, write_overrides  # noqa: E402
from rosutil import fresh_domain  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = f"{REPO / 'test' / 'tiny_pipeline.py'}:TinyPipeline.from_config"
# A minimal launcher: one process group (it leads it), the nodes as its children, which stays up through the signals
# (a handler, not SIG_IGN: ignored dispositions would be inherited) and reports the nodes' exit codes.
LAUNCHER = """
import json, signal, subprocess, sys
for s in (signal.SIGINT, signal.SIGTERM):
    signal.signal(s, lambda *a: None)
jobs = json.loads(sys.argv[1])
procs = [subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT) for cmd, log in jobs]
print(json.dumps([p.wait() for p in procs]), flush=True)
"""
SUMMARY = re.compile(r"shutdown \((SIGINT|SIGTERM)\): (\d+) frames in, (\d+) published, (\d+) dropped")


def _env(**extra):
    env = dict(os.environ, ROS_DOMAIN_ID=str(fresh_domain()), PYTHONUNBUFFERED="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "test"), env.get("PYTHONPATH", "")])
    return env


def _wait_for(path: Path, pattern: str, procs, timeout: float) -> str:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        text = path.read_text() if path.is_file() else ""
        if re.search(pattern, text):
            return text
        for p in procs:
            assert p.poll() is None, f"a node exited early ({p.returncode}):\n{text[-3000:]}"
        time.sleep(0.1)
    raise AssertionError(f"{pattern!r} not in {path} after {timeout} s:\n{text[-3000:]}")


def _assert_clean(log: str, rc: int, name: str) -> None:
    assert rc == 0, f"{name} exited with {rc}:\n{log[-3000:]}"
    for bad in ("Traceback", "KeyboardInterrupt", "never retrieved", "Failed to publish"):
        assert bad not in log, f"{name}: {bad!r} in its output:\n{log[-3000:]}"


def _check_detector_summary(log: str, sig: str) -> None:
    m = SUMMARY.search(log)
    assert m, log[-3000:]
    assert m.group(1) == sig
    n_in, n_out, n_drop = (int(x) for x in m.groups()[1:])
    assert n_in >= 2 and n_out >= 1, log[-3000:]
    # every frame that came in is accounted for: published, or dropped (by the busy worker or at shutdown)
    assert n_in == n_out + n_drop, log[-3000:]


def _signal_detector_alone(spec, sig, ready, **env_extra):
    """The detector of ``spec`` alone (its own session, output to a log file): once ``ready(log path, process,
    environment)`` has returned, ``sig``. -> (its output, its exit code)."""
    tmp = Path(tempfile.mkdtemp(prefix="cmfiou_sig_"))
    log = tmp / "det.log"
    env = _env(**env_extra)
    p = subprocess.Popen(node_command(spec, write_overrides(spec, str(tmp))), env=env, cwd=tmp,
                         stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        ready(log, p, env)
        p.send_signal(sig)
        rc = p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    return log.read_text(), rc


@pytest.mark.parametrize("signals", [(signal.SIGINT, signal.SIGINT, signal.SIGTERM), (signal.SIGTERM, signal.SIGTERM)],
                         ids=["ctrl-c-then-launch-sigint-sigterm", "sigterm-twice"])
def test_launch_like_process_group(kitti_samples, signals):
    """Both nodes (the graph's own commands) in one process group; the group gets the signals in a row while the
    detector is inferring a frame."""
    tmp = Path(tempfile.mkdtemp(prefix="cmfiou_sig_"))
    specs = graph.replay_graph({"data": str(kitti_samples / "object"), "rate": "4", "loop": "true", "lockstep": "false",
                                "pipeline_factory": TINY})
    env = _env(CMFIOU_TINY_SLEEP_MS="1200")
    logs = [tmp / f"{spec.name}.log" for spec in specs]
    jobs = [(node_command(spec, write_overrides(spec, str(tmp))), str(log)) for spec, log in zip(specs, logs)]
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, json.dumps(jobs)], env=env, cwd=tmp,
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        # two outputs seen by the replay: frames flow, and with 1.2 s per frame at 4 Hz one is in flight now
        _wait_for(logs[0], r"frame \d+ \(\d+\): \d+ detection(s)?: .*\n(.|\n)*frame \d+ \(\d+\): ", [launcher], 90)
        for s in signals:
            os.killpg(launcher.pid, s)
            time.sleep(0.3)
        out, _ = launcher.communicate(timeout=40)
        rcs = json.loads(out)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    texts = [log.read_text() for log in logs]
    for spec, text, rc in zip(specs, texts, rcs):
        _assert_clean(text, rc, spec.name)
    _check_detector_summary(texts[1], signal.Signals(signals[0]).name)
    assert re.search(r"shutdown \(SIG\w+\): \d+ frames published, \d+ outputs, \d+ dropped", texts[0]), texts[0]


def test_detector_alone_sigterm():
    """The detector alone (no input): SIGTERM once -> exit 0, quiet. (Its configure line names the synchroniser.)"""
    spec = graph.replay_graph({"pipeline_factory": TINY, "sync_policy": "approx"})[1]
    text, rc = _signal_detector_alone(spec, signal.SIGTERM, lambda log, p, env: _wait_for(log, "configured:", [p], 60))
    _assert_clean(text, rc, "detector")
    assert "shutdown (SIGTERM): 0 frames in, 0 published, 0 dropped" in text, text
    from cmfiou_ros.sync import real_message_filters

    impl = "message_filters.ApproximateTimeSynchronizer" if real_message_filters() else "cmfiou_ros.sync.ApproxTimeSync"
    assert f"configured: sync=approx ({impl}" in text, text


def test_run_graph_ctrl_c(kitti_samples, tmp_path):
    """Ctrl-C in the terminal of run_graph (its process group; the nodes run in their own sessions and get the
    signal from run_graph): every node ends cleanly and run_graph exits 0."""
    logs = tmp_path / "logs"
    proc = subprocess.Popen([sys.executable, "-m", "cmfiou_ros.run_graph", f"data:={kitti_samples / 'object'}",
                             "rate:=4", "loop:=true", "lockstep:=false", f"pipeline_factory:={TINY}", "--log-dir",
                             str(logs)], env=_env(CMFIOU_TINY_SLEEP_MS="1200"), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        # two outputs: the first frame was published completely (detections, scores, markers, timings)
        _wait_for(logs / "kitti_replay.log", r"frame \d+ \(\d+\): \d+ detection(s)?: .*\n(.|\n)*frame \d+ \(\d+\): ",
                  [proc], 90)
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=40)
        out = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0 and "every node exited cleanly (SIGINT)" in out, out
    for name in ("kitti_replay", "cmfiou_detector"):
        _assert_clean((logs / f"{name}.log").read_text(), 0, name)
    _check_detector_summary((logs / "cmfiou_detector.log").read_text(), "SIGINT")


def test_frame_longer_than_the_grace_is_dropped_and_counted(kitti_samples):
    """A frame still inferring SHUTDOWN_GRACE_S after Ctrl-C (a slow CPU) is abandoned: counted as dropped, exit 0
    at once, so launch's SIGTERM / SIGKILL escalation (5 s + 5 s) never has to kill the node."""
    from cmfiou_ros.detector_node import SHUTDOWN_GRACE_S

    tmp = Path(tempfile.mkdtemp(prefix="cmfiou_sig_"))
    specs = graph.replay_graph({"data": str(kitti_samples / "object"), "max_frames": "1", "pipeline_factory": TINY})
    specs[1].parameters["warmup"] = False
    logs = [tmp / f"{spec.name}.log" for spec in specs]
    jobs = [(node_command(spec, write_overrides(spec, str(tmp))), str(log)) for spec, log in zip(specs, logs)]
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, json.dumps(jobs)],
                                env=_env(CMFIOU_TINY_SLEEP_MS=str(int((SHUTDOWN_GRACE_S + 20) * 1e3))), cwd=tmp,
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for(logs[0], "replaying", [launcher], 60)
        _wait_for(logs[1], "configured:", [launcher], 60)
        time.sleep(3.0)  # the one frame is published (start_delay 0.5 s) and inferring
        t0 = time.monotonic()
        os.killpg(launcher.pid, signal.SIGINT)
        out, _ = launcher.communicate(timeout=60)
        took = time.monotonic() - t0
        rcs = json.loads(out)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    det = logs[1].read_text()
    _assert_clean(det, rcs[1], "cmfiou_detector")
    _assert_clean(logs[0].read_text(), rcs[0], "kitti_replay")
    assert f"1 still inferring after {SHUTDOWN_GRACE_S:g} s" in det, det
    assert "shutdown (SIGINT): 1 frames in, 0 published, 1 dropped" in det, det
    assert took < SHUTDOWN_GRACE_S + 8, took


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_signal_during_warm_up_is_a_clean_exit(sig):
    """A signal while the pipeline warms up (3 s here): the warm-up step finishes (a torch op is not
    interruptible), then exit 0 -- no failed lifecycle transition, no traceback, no /rosout errors."""
    spec = graph.replay_graph({"pipeline_factory": TINY})[1]
    spec.parameters["warmup"] = True
    text, rc = _signal_detector_alone(spec, sig, lambda log, p, env: _wait_for(log, "pipeline loaded by", [p], 60),
                                      CMFIOU_TINY_SLEEP_MS="3000")
    _assert_clean(text, rc, "detector")
    name = signal.Signals(sig).name
    assert f"{name} during start-up (parameters, pipeline load / warm-up): not configured" in text, text
    assert f"shutdown ({name}): 0 frames in, 0 published, 0 dropped" in text, text
    for bad in ("Failed to complete transition", "rosout", "configure failed"):
        assert bad not in text, text


def test_sigterm_while_unconfigured_is_a_clean_exit():
    """autostart:=false: the node waits unconfigured for the lifecycle services; SIGTERM (as soon as the node is in
    the ROS graph, which may still be during its start-up) -> exit 0, quiet."""
    spec = graph.replay_graph({"pipeline_factory": TINY})[1]
    spec.parameters["autostart"] = False

    def in_the_graph(log, p, env):  # the node is in the graph: it is up (its signal handlers are installed)
        import rclpy

        ctx = rclpy.Context()
        rclpy.init(context=ctx, domain_id=int(env["ROS_DOMAIN_ID"]))
        try:
            probe = rclpy.create_node("unconfigured_probe", context=ctx)
            t_end = time.monotonic() + 60
            while "cmfiou_detector" not in probe.get_node_names() and time.monotonic() < t_end:
                assert p.poll() is None, log.read_text()
                time.sleep(0.1)
            probe.destroy_node()
        finally:
            rclpy.shutdown(context=ctx)
        assert p.poll() is None, log.read_text()
    text, rc = _signal_detector_alone(spec, signal.SIGTERM, in_the_graph)
    _assert_clean(text, rc, "detector")
    assert "shutdown (SIGTERM): 0 frames in, 0 published, 0 dropped" in text and "configured:" not in text, text
