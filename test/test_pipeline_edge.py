"""The real pipeline on frames it cannot detect anything in: an answer (empty Detections with the reason in
``note``), never an exception."""
import numpy as np
import pytest

from cmfiou_core.calib import Calibration
from cmfiou_core.types import Frame


@pytest.fixture(scope="module")
def pipe():
    from cmfiou_core.pipeline import Pipeline

    return Pipeline.from_config(None, None, "cpu")  # bundled demo checkpoint


def _cloud(n=5000, x0=5.0):
    rng = np.random.default_rng(1)
    return np.stack([rng.uniform(x0, x0 + 40, n), rng.uniform(-15, 15, n), rng.uniform(-1.5, 0.5, n),
                     rng.uniform(0, 1, n)], 1).astype(np.float32)


def _calib(w, h):
    P2 = np.array([[0.6 * w, 0, w / 2, 0], [0, 0.6 * w, h / 2, 0], [0, 0, 1, 0]])
    Tr = np.array([[0, -1, 0, 0], [0, 0, -1, -0.08], [1, 0, 0, -0.27]], dtype=np.float64)
    return Calibration(P2, np.eye(3), Tr, w, h)


@pytest.mark.parametrize("where", ["far", "behind", "origin"])
def test_no_point_in_range_gives_empty_detections_with_the_reason(pipe, where):
    pts = _cloud()
    if where == "far":
        pts[:, 0] += 500.0
    elif where == "behind":
        pts[:, 0] = -pts[:, 0]
    else:
        pts[:, :3] = 0.0
        pts[:, 2] = -10.0  # at the origin's x/y, below the range's z
    det = pipe(Frame(pts, stamp_ns=7, frame_id="velo"))
    assert len(det) == 0 and det.stamp_ns == 7 and det.frame_id == "velo" and det.lidar_only
    assert det.note.startswith("no LiDAR point inside the detection range x [0, 70.4]"), det.note
    # behind the sensor with a camera: nothing in the camera's field of view either
    img = np.zeros((375, 1242, 3), np.uint8)
    det = pipe(Frame(pts, img, _calib(1242, 375)))
    assert len(det) == 0 and "field of view" in det.note


def test_tiny_image_runs_lidar_only_and_says_so(pipe):
    pts = _cloud()
    det = pipe(Frame(pts, np.full((2, 2, 3), 128, np.uint8), _calib(2, 2)))
    ref = pipe(Frame(pts, None, _calib(2, 2)))  # the same frame without its image
    assert det.lidar_only and "image 2x2 is smaller than the 3x3" in det.note
    assert len(det) == len(ref) and np.allclose(det.boxes, ref.boxes) and np.allclose(det.scores, ref.scores)
    det3 = pipe(Frame(pts, np.full((3, 3, 3), 128, np.uint8), _calib(3, 3)))  # the smallest image that is used
    assert not det3.lidar_only and det3.note == ""


def test_checkpoint_with_nan_weights_is_refused(tmp_path):
    """A checkpoint that loads but holds NaN weights (it would detect nothing, silently) is refused at load."""
    import torch

    from cmfiou_core.config import ConfigError
    from cmfiou_core.pipeline import Pipeline, demo_checkpoint

    ck = torch.load(demo_checkpoint(), map_location="cpu", weights_only=True)
    state = ck["model_state"] if "model_state" in ck else ck
    key = next(k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and v.numel() > 1)
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")
    bad = tmp_path / "nan.pt"
    torch.save(ck, bad)
    with pytest.raises(ConfigError, match=r"1 weight tensor\(s\) contain NaN or inf .*" + key.replace(".", r"\.")):
        Pipeline.from_config(None, str(bad), "cpu")


def test_weights_source_is_reported(pipe):
    from cmfiou_core.pipeline import Pipeline

    assert pipe.weights.startswith("demo: bundled checkpoint cmfiou_synthetic_demo_fp16.pt")
    assert Pipeline.from_config(None, "none", "cpu").weights.startswith("random")


def test_inference_engine_from_config_argument_and_auto(tmp_path):
    """``inference.engine`` selects the engine (auto: graph on CUDA, eager on the CPU); the factory argument wins;
    a bad value or an unknown key in the section is an error naming it."""
    import yaml

    from cmfiou_core.config import ConfigError
    from cmfiou_core.pipeline import Pipeline, default_config

    base = yaml.safe_load(default_config().read_text())
    assert Pipeline.from_config(None, "none", "cpu").engine == "eager"           # no section: auto, eager on the CPU

    def write(section):
        cfg = dict(base, inference=section)
        p = tmp_path / "cfg.yaml"
        p.write_text(yaml.safe_dump(cfg))
        return p

    assert Pipeline.from_config(write({"engine": "graph"}), "none", "cpu").engine == "graph"
    assert Pipeline.from_config(write({"engine": "auto"}), "none", "cpu").engine == "eager"
    assert Pipeline.from_config(write({"engine": "graph"}), "none", "cpu", engine="eager").engine == "eager"
    with pytest.raises(ConfigError, match="inference.engine"):
        Pipeline.from_config(write({"engine": "fast"}), "none", "cpu")
    with pytest.raises(ConfigError, match="engin"):
        Pipeline.from_config(write({"engin": "graph"}), "none", "cpu")
    with pytest.raises(ConfigError, match="engine must be one of"):
        Pipeline.from_config(None, "none", "cpu", engine="fast")


def test_graph_engine_unsupported_names_what_the_engine_cannot_run():
    """``engine: auto`` falls back to eager (with this reason logged) for configs the graph engine refuses: the
    official release's duplicate image-plane sites and wide view batching; the shipped config runs on the engine, and
    the engine itself refuses the official config with the same cause."""
    from cmfiou_core.model.model_config import graph_engine_unsupported
    from cmfiou_core.pipeline import Pipeline, default_config, load_config
    from cmfiou_core.resources import config as config_path

    assert graph_engine_unsupported(load_config(default_config()).model) is None
    official = load_config(config_path("cmfiou_kitti_official.yaml"))
    why = graph_engine_unsupported(official.model)
    assert why is not None and "image_plane_duplicates" in why and "'official'" in why
    with pytest.raises(ValueError, match="image_plane_duplicates"):
        Pipeline.from_config(config_path("cmfiou_kitti_official.yaml"), "none", "cpu", engine="graph")
