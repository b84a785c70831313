"""Helpers shared by the ROS-layer tests: importing ROS modules (:func:`require`), child ROS processes
(:func:`child_ros_env`, :func:`run_children`), in-process node construction, KITTI messages, waiting."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Sequence

import numpy as np
import pytest

TEST_DIR = Path(__file__).resolve().parent
REPO = TEST_DIR.parent
FASTDDS_PROFILE = REPO / "config" / "fastdds_shm.xml"


def require(module: str):
    """Import a ROS module a test needs. Missing: the test (or, at module level, the file) is skipped -- unless
    ``CMFIOU_REQUIRE_ROS`` is set (``scripts/test.sh`` sets it once ``setup.sh`` has installed ROS), where a missing
    module is a failure, never a silent skip."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if os.environ.get("CMFIOU_REQUIRE_ROS"):
            pytest.fail(f"{module} is not importable ({exc}) but CMFIOU_REQUIRE_ROS is set: run scripts/setup.sh "
                        "and . .venv/cmfiou.env", pytrace=False)
        pytest.skip(f"{module} not importable ({exc}); run scripts/setup.sh and . .venv/cmfiou.env",
                    allow_module_level=True)
# The pipeline the ROS tests run (module:callable), overridable from the environment.
PIPELINE_FACTORY = os.environ.get("CMFIOU_TEST_PIPELINE_FACTORY",
                                  "cmfiou_core.pipeline:Pipeline.from_config")
PIPELINE_CONFIG = os.environ.get("CMFIOU_TEST_PIPELINE_CONFIG", str(REPO / "config" / "cmfiou_kitti.yaml"))
PIPELINE_CHECKPOINT = os.environ.get("CMFIOU_TEST_PIPELINE_CHECKPOINT", "")

_domain_lock = threading.Lock()
_domain_next = [0]


def fresh_domain() -> int:
    """A ROS_DOMAIN_ID unlikely to collide with other test processes running at the same time (1..101 avoided)."""
    with _domain_lock:
        _domain_next[0] += 1
        return 110 + (os.getpid() * 7 + _domain_next[0]) % 100


def child_ros_env(domain_id: int = None) -> dict:
    """Environment for a child ROS process: a private domain, the project's Fast DDS SHM profile, localhost
    discovery, the repository importable, unbuffered output."""
    env = dict(os.environ)
    env["ROS_DOMAIN_ID"] = str(fresh_domain() if domain_id is None else domain_id)
    env["FASTDDS_DEFAULT_PROFILES_FILE"] = str(FASTDDS_PROFILE)
    env["RMW_IMPLEMENTATION"] = "rmw_fastrtps_cpp"
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env.pop("ROS_LOCALHOST_ONLY", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_children(scripts: Dict[str, str], args: Sequence[str], timeout: float = 90.0) -> Dict[str, dict]:
    """Start one ``python -c script args`` child per entry (in order, one shared private domain), wait for all;
    return the JSON each printed on its last ``{``-line. A child that times out, exits non-zero or prints no result
    fails the test with its output."""
    env = child_ros_env()
    procs = {name: subprocess.Popen([sys.executable, "-c", script, *args], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name, script in scripts.items()}
    results = {}
    try:
        for name, proc in procs.items():
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                pytest.fail(f"{name} timed out after {timeout} s\nstdout:\n{out}\nstderr:\n{err}")
            if proc.returncode != 0:
                pytest.fail(f"{name} exited {proc.returncode}\nstdout:\n{out}\nstderr:\n{err}")
            lines = [ln for ln in out.splitlines() if ln.startswith("{")]
            assert lines, f"{name} printed no result\nstdout:\n{out}\nstderr:\n{err}"
            results[name] = json.loads(lines[-1])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def wait_until(pred, timeout: float, step: float = 0.02, spin=None) -> bool:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if spin is not None:
            spin(step)
        if pred():
            return True
        if spin is None:
            time.sleep(step)
    return pred()


def kitti_frame_msgs(kitti_samples, k: int, stamp_ns: int):
    """(cloud, image, camera_info, T 4x4, index) ROS messages of object frame k, all stamped ``stamp_ns``."""
    from cmfiou_ros import convert as C
    from cmfiou_ros.replay_node import KittiSource

    src = KittiSource(str(kitti_samples / "object"))
    idx, pts, rgb, calib = src.load(k % len(src))
    T = np.eye(4)
    T[:3] = calib.Tr_velo_to_cam
    return (C.xyzi_to_pointcloud2(pts, stamp_ns, "velo_link"), C.rgb_to_image(rgb, stamp_ns, "cam"),
            C.calibration_to_camera_info(calib, stamp_ns, "cam"), T, idx)


def make_detector(ctx, pipeline=None, **params):
    """An in-process DetectorNode (configured + active) with a given pipeline object and parameter overrides."""
    from rclpy.parameter import Parameter

    from cmfiou_ros.detector_node import DetectorNode

    overrides = [Parameter(k, value=v) for k, v in params.items()]
    node = DetectorNode(pipeline=pipeline, context=ctx, parameter_overrides=overrides)
    return node
