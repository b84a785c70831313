"""One answer per frame: the same real KITTI frames through the three evaluation paths -- ``python -m
cmfiou_core.tools.evaluate`` (files on disk), ``cmfiou-bag-eval --mode offline`` (a bag, in process) and
``cmfiou-bag-eval --mode node`` (the bag's raw CDR over real rclpy into the detector node) -- with the real
camera+LiDAR pipeline write identical result files, and every frame ran with the camera.

The two frames have different calibrations (KITTI 000006 and 000000 are the only sample frames whose calib files
differ from the rest), so a path that used another frame's calibration, decoded the image differently, drew the
pseudo-point discard from a stream shared across frames, or converted boxes differently would show here."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cmfiou_core import resources
from cmfiou_core.pipeline import DEMO_CHECKPOINT_NAME, demo_checkpoint, demo_config
from kitti_format import check_result_text
from rosutil import require  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FRAMES = ["000006", "000000"]


def _run(args, env=None, timeout=600):
    r = subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True, cwd=REPO,
                       env=env, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


@pytest.fixture(scope="module")
def three_paths(tmp_path_factory, kitti_samples):
    """The two frames through evaluate, bag-eval offline and bag-eval node mode; -> (folder, node report)."""
    if not resources.exists("models", DEMO_CHECKPOINT_NAME):
        pytest.skip("bundled demo checkpoint missing")
    pytest.importorskip("rosbags")
    require("rclpy")
    require("vision_msgs.msg")
    tmp = tmp_path_factory.mktemp("one_answer")
    src = kitti_samples / "object" / "training"
    data = tmp / "kitti"
    for sub, ext in (("velodyne", "bin"), ("image_2", "png"), ("calib", "txt"), ("label_2", "txt")):
        (data / "training" / sub).mkdir(parents=True)
        for i in FRAMES:
            shutil.copy(src / sub / f"{i}.{ext}", data / "training" / sub / f"{i}.{ext}")
    (data / "ImageSets").mkdir()
    ids = data / "ImageSets" / "pair.txt"
    ids.write_text("\n".join(FRAMES) + "\n")
    model = ["--config", demo_config(), "--checkpoint", demo_checkpoint()]
    _run(["cmfiou_core.tools.evaluate", "--data", data, "--split", "pair", *model, "--out", tmp / "evaluate"])
    bag = tmp / "bag"
    _run(["cmfiou_core.tools.kitti2bag", "--object", data / "training", "--ids", ids, "--out", bag])
    _run(["cmfiou_ros.bag_eval", bag, "--out", tmp / "offline", "--mode", "offline", *model])
    env = {**os.environ, "ROS_DOMAIN_ID": str(100 + os.getpid() % 80)}
    _run(["cmfiou_ros.bag_eval", bag, "--out", tmp / "node", "--mode", "node", "--rate", "0", *model,
          "--node-timeout", "120"], env=env)
    return tmp, json.loads((tmp / "node" / "report.json").read_text())


def _texts(tmp, i):
    return {p: (tmp / p / "results" / f"{i}.txt").read_text() for p in ("evaluate", "offline", "node")}


def test_evaluate_and_offline_bag_write_identical_result_files(three_paths):
    tmp, _ = three_paths
    n = 0
    for i in FRAMES:
        t = _texts(tmp, i)
        assert t["evaluate"] == t["offline"], i
        n += check_result_text(t["evaluate"], 1242, 375, i)
    assert n > 0  # the frames have detections to compare


def test_node_mode_writes_the_same_result_files(three_paths):
    tmp, node = three_paths
    assert node["frames"]["ok"] == len(FRAMES)
    assert node["frames"]["lidar_only_frames"] == {}, node["frames"]
    for i in FRAMES:
        t = _texts(tmp, i)
        assert t["node"] == t["offline"], i
