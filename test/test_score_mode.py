"""DetectionScores.score_mode says how ``score`` was computed, from the model config, through the real node: the
.msg constants are exactly the code's modes, our config publishes "rectified" scores (= cls^(1-a_c) * iou^a_c), the
official config "cls" scores (= cls_score)."""
import sys
from pathlib import Path

import numpy as np
import pytest

from rosutil import require  # noqa: E402  (pytest puts test/ on sys.path)
rclpy = require("rclpy")
require("cmfiou_ros.msg")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rosutil import fresh_domain, kitti_frame_msgs, make_detector, wait_until  # noqa: E402

from cmfiou_core import resources  # noqa: E402
from cmfiou_core.model.iou_joint import SCORE_MODES  # noqa: E402
from cmfiou_core.model.model_config import load_config  # noqa: E402
from cmfiou_core.pipeline import Pipeline  # noqa: E402
from cmfiou_ros.detector_node import TransitionCallbackReturn  # noqa: E402

S = 1_000_000_000


def test_msg_constants_equal_the_code_modes():
    from cmfiou_ros.msg import DetectionScores

    consts = {getattr(DetectionScores, c) for c in dir(DetectionScores) if c.startswith("SCORE_MODE_")}
    assert consts == set(SCORE_MODES)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    from cmfiou_core.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("scene")
    generate_dataset(root / "object", 1, seed=11, split="training", val_fraction=0.0)
    return root


@pytest.mark.parametrize("config,checkpoint,mode", [("cmfiou_kitti.yaml", "", "rectified"),
                                                    ("cmfiou_kitti_official.yaml", "none", "cls")])
def test_score_mode_through_the_node(scene, tmp_path, config, checkpoint, mode):
    """Our config with the demo checkpoint, the official config with random weights (no official weights here) and
    IP-Basic depth (no PENet weights are bundled; depth does not touch the scores)."""
    import yaml
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    from cmfiou_ros.msg import DetectionScores

    cfg_path = resources.config(config)
    doc = yaml.safe_load(cfg_path.read_text())
    if doc["depth"]["method"] == "penet":
        doc["depth"]["method"] = "ipbasic"
        cfg_path = tmp_path / config
        cfg_path.write_text(yaml.safe_dump(doc))
    post = load_config(cfg_path).model.post_processing
    assert post.score_mode == mode
    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=fresh_domain())
    node = col = ex = None
    try:
        pipe = Pipeline.from_config(cfg_path, checkpoint, "cpu")
        node = make_detector(ctx, pipe, image_wait=0.0, score_threshold=0.0, warmup=False)
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        got = []
        col = rclpy.create_node("score_mode_collector", context=ctx)
        col.create_subscription(DetectionScores, "/cmfiou_detector/scores", got.append,
                                QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
        ex = SingleThreadedExecutor(context=ctx)
        ex.add_node(col)
        cloud, img, info, T, _ = kitti_frame_msgs(scene, 0, 100 * S)
        node._param_T = T
        node.on_camera_info(info)
        node.on_image(img)
        node.on_cloud(cloud)
        assert wait_until(lambda: got, 120, spin=lambda t: ex.spin_once(timeout_sec=t))
        m = got[0]
        assert m.score_mode == mode
        cls, iou, score = (np.asarray(x, np.float64) for x in (m.cls_score, m.iou_score, m.score))
        if mode == "cls":
            np.testing.assert_array_equal(score, cls)
        else:
            assert len(score) > 0  # the demo checkpoint detects the generated objects
            alpha = np.asarray(post.rectifier_alpha)[[list(pipe.class_names).index(c) for c in m.class_id]]
            np.testing.assert_allclose(score, cls ** (1 - alpha) * iou ** alpha, rtol=1e-4, atol=1e-6)
    finally:
        if ex is not None:
            ex.shutdown()
        for n in (col, node):
            if n is not None:
                if hasattr(n, "_teardown"):
                    n._teardown()
                n.destroy_node()
        rclpy.shutdown(context=ctx)
