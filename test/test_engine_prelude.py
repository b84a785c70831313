"""The static, sync-free front of the graph engine (cmfiou_core/engine/prelude.py) against the eager stages it
replaces, bit for bit: the Voxelizer and the mean VFE (a real KITTI frame, with padding rows scattered between the
valid ones, and crafted cases: a voxel with more than max_points points, more than max_voxels voxels, no valid
point, points outside the grid)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cmfiou_core.engine.prelude import engine_inputs, vfe_static, voxelize_static
from cmfiou_core.model.vfe import mean_voxel_features
from cmfiou_core.model.voxelize import Voxelizer

REPO = Path(__file__).resolve().parents[1]
VOXEL = [0.05, 0.05, 0.05]
RANGE = [0.0, -40.0, -3.0, 70.4, 40.0, 1.0]


@pytest.fixture(scope="module")
def kitti_frame(kitti_samples):
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    from bench_pipeline import load_frames

    (name, frame), = load_frames([str(kitti_samples / "object" / "training")], 0, REPO / "data", 1)[:1]
    return frame


def _other_calib(kitti_samples, frame, stem: str):
    """Another real KITTI object calibration (frame ``stem``'s file: other P2, R0_rect and Tr_velo_to_cam than
    ``frame``'s) with ``frame``'s image size, so only the calibration differs."""
    from cmfiou_core.calib import Calibration

    h, w = frame.image.shape[:2]
    cal = Calibration.from_kitti_object_file(kitti_samples / "object" / "training" / "calib" / f"{stem}.txt", w, h)
    assert not np.array_equal(cal.P2, frame.calib.P2) and not np.array_equal(cal.Tr_velo_to_cam,
                                                                           frame.calib.Tr_velo_to_cam)
    return cal


@pytest.fixture(scope="module")
def other_calib_frame(kitti_samples, kitti_frame):
    """``kitti_frame`` (000000, 1224x370) with frame 000001's calibration."""
    import dataclasses

    return dataclasses.replace(kitti_frame, calib=_other_calib(kitti_samples, kitti_frame, "000001"))


def _rows(points: np.ndarray) -> torch.Tensor:
    from cmfiou_core.depth.pseudo import raw_rows_from_points

    return raw_rows_from_points(torch.from_numpy(points))


def _padded(rows: torch.Tensor, extra: int, seed: int):
    """rows scattered among ``extra`` padding rows (garbage values, NaN included) in a random layout, the valid rows
    keeping their order -> (padded rows, valid mask)."""
    g = torch.Generator().manual_seed(seed)
    n = rows.shape[0]
    total = n + extra
    valid = torch.zeros(total, dtype=torch.bool)
    valid[torch.randperm(total, generator=g)[:n]] = True
    out = torch.randn(total, rows.shape[1], generator=g) * 30
    out[torch.nonzero(~valid)[:5, 0]] = float("nan")
    out[valid] = rows
    return out, valid


def _check_voxels(rows, valid, max_points, max_voxels, expect_overflow=None):
    vox = Voxelizer(VOXEL, RANGE, max_points, max_voxels)
    ref_v, ref_c, ref_n = vox(rows[valid])
    got = voxelize_static(rows, valid, VOXEL, RANGE, vox.grid_size_xyz, max_points, max_voxels)
    n = int(got.count)
    assert n == ref_v.shape[0]
    assert torch.equal(got.voxels[:n], ref_v) and torch.equal(got.coords[:n], ref_c)
    assert torch.equal(got.num_points[:n], ref_n)
    # padding: zero voxels, coordinates -1, no points
    assert not got.voxels[n:].any() and bool((got.coords[n:] == -1).all()) and not got.num_points[n:].any()
    if expect_overflow is not None:
        assert (int(got.total) > max_voxels) == expect_overflow
    for flag_max in (True, False):
        f = vfe_static(got, flag_max)
        assert torch.equal(f[:n], mean_voxel_features(ref_v, ref_n, flag_max))
        assert not f[n:].any()
    return got


@pytest.mark.parametrize("seed", [0, 1])
def test_voxelize_and_vfe_equal_eager_on_a_real_frame(kitti_frame, seed):
    rows = _rows(kitti_frame.points)
    p, valid = _padded(rows, 5000, seed)
    got = _check_voxels(p, valid, 5, 40000)
    assert int(got.count) > 10000   # the whole 360-degree cloud: 43935 voxels, more than max_voxels


def test_voxelize_more_voxels_than_max_voxels_keeps_the_first_appearing(kitti_frame):
    rows = _rows(kitti_frame.points)[::7]
    p, valid = _padded(rows, 300, 2)
    got = _check_voxels(p, valid, 5, 1000, expect_overflow=True)
    assert int(got.count) == 1000 < int(got.total)


def test_voxelize_voxel_with_more_than_max_points():
    g = torch.Generator().manual_seed(4)
    n = 400
    pts = torch.zeros(n, 8)
    # 3 crowded voxels (many points each) and scattered singles, interleaved in input order
    centres = torch.tensor([[10.012, 0.012, -1.012], [20.03, 5.03, 0.03], [30.04, -7.04, -2.04]])
    which = torch.randint(0, 6, (n,), generator=g)
    crowd = which < 3
    pts[crowd, :3] = centres[which[crowd]] + torch.rand(int(crowd.sum()), 3, generator=g) * 0.01
    pts[~crowd, :3] = torch.stack([torch.rand(int((~crowd).sum()), generator=g) * 70,
                                   torch.rand(int((~crowd).sum()), generator=g) * 80 - 40,
                                   torch.rand(int((~crowd).sum()), generator=g) * 4 - 3], 1)
    pts[:, 3:7] = torch.rand(n, 4, generator=g) * 50
    pts[:, 7] = torch.randint(1, 3, (n,), generator=g).float()
    p, valid = _padded(pts, 100, 5)
    got = _check_voxels(p, valid, 5, 40000)
    assert int(got.num_points.max()) == 5 and int((got.num_points == 5).sum()) >= 3
    got = _check_voxels(p, valid, 1, 40000)


def test_voxelize_empty_and_out_of_grid():
    rows = torch.tensor([[-1.0, 0, 0, 1, 0, 0, 0, 2], [10, 50, 0, 1, 0, 0, 0, 2], [70.4, 0, 0, 1, 0, 0, 0, 2],
                         [10, 0, 1.0, 1, 0, 0, 0, 2], [float("nan"), 0, 0, 0, 0, 0, 0, 2]])
    for valid in (torch.ones(5, dtype=torch.bool), torch.zeros(5, dtype=torch.bool)):
        got = _check_voxels(rows, valid, 5, 100)
        assert int(got.count) == 0 and int(got.total) == 0
    got = _check_voxels(torch.zeros(0, 8), torch.zeros(0, dtype=torch.bool), 5, 100)
    assert int(got.count) == 0


def test_engine_inputs_equal_the_backbones_gather(kitti_frame):
    """Two views of padded VFE output -> the layout EngineBackbone._gather_inputs builds from the eager batch."""
    from cmfiou_core.engine.runtime import EngineBackbone

    rows = _rows(kitti_frame.points)
    vox = Voxelizer(VOXEL, RANGE, 5, 40000)
    views, batch = [], {"batch_size": 1}
    for v, r in enumerate((rows[::3], rows[1::5])):
        p, valid = _padded(r, 700, v)
        sv = voxelize_static(p, valid, VOXEL, RANGE, vox.grid_size_xyz, 5, 40000)
        views.append((vfe_static(sv, True), sv.coords, sv.count))
        ev, ec, en = vox(r)
        sfx = "" if v == 0 else str(v)
        batch["voxel_features" + sfx] = mean_voxel_features(ev, en, True)
        batch["voxel_coords" + sfx] = torch.cat([torch.zeros(ec.shape[0], 1, dtype=torch.int32), ec], 1)
    eb = EngineBackbone.__new__(EngineBackbone)
    eb.input_capacity = 40000
    ref_f, ref_c, ref_n = eb._gather_inputs(batch, 1, 2, ["", "1"])[""]
    f, c, n = engine_inputs([a for a, _, _ in views], [b for _, b, _ in views], [c for _, _, c in views], 80000)
    assert int(n) == int(ref_n) and torch.equal(f, ref_f) and torch.equal(c, ref_c)


# ----------------------------------------------------------------------------------------------- depth, discard
@pytest.fixture(scope="module")
def depth_gen():
    from cmfiou_core.depth.config import DepthConfig
    from cmfiou_core.depth.pseudo import PseudoPointGenerator
    from cmfiou_core.model.model_config import load_config
    from cmfiou_core.pipeline import default_config

    cfg = load_config(default_config())
    return PseudoPointGenerator(DepthConfig.from_dict(cfg.depth, cfg.source))


@pytest.fixture(scope="module")
def eager_depth(kitti_frame, depth_gen):
    pts = torch.from_numpy(kitti_frame.points)
    img = torch.from_numpy(kitti_frame.image)
    return pts, img, depth_gen(pts, img, kitti_frame.calib)


def _padded_points(pts, extra, seed):
    p, valid = _padded(torch.cat([pts, torch.zeros(pts.shape[0], 4)], 1), extra, seed)
    return p[:, :4].contiguous(), valid


def test_depth_static_equals_the_generator(kitti_frame, depth_gen, eager_depth):
    from cmfiou_core.depth.pseudo import raw_rows_from_points
    from cmfiou_core.engine.prelude import depth_static

    pts, img, ref = eager_depth
    p, valid = _padded_points(pts, 3000, 7)
    n = ref.pseudo_rows.shape[0]
    got = depth_static(depth_gen, p, valid, img, kitti_frame.calib, n + 5000)
    assert torch.equal(raw_rows_from_points(p)[got.raw_valid], ref.raw_rows)
    assert int(got.n_pseudo) == n > 10000 and not bool(got.thinning_overflow)
    assert torch.equal(got.pseudo[:n], ref.pseudo_rows) and not got.pseudo[n:].any()
    assert int(got.pseudo_valid.sum()) == n
    # a capacity below the count: the count still says how many rows the eager generator made (-> re-run)
    small = depth_static(depth_gen, p, valid, img, kitti_frame.calib, n // 2)
    assert int(small.n_pseudo) == n and torch.equal(small.pseudo, ref.pseudo_rows[:n // 2])


def test_depth_static_thinning_overflow_and_sort_thinning(kitti_frame, depth_gen, eager_depth):
    """A thinning voxel with more than max_points_per_voxel points: the dense thinning says so (the eager generator
    then re-thins by sorting), and the sort thinning equals the eager rows."""
    import dataclasses

    from cmfiou_core.depth.pseudo import PseudoPointGenerator
    from cmfiou_core.engine.prelude import depth_static

    pts, img, _ = eager_depth
    cfg = dataclasses.replace(depth_gen.cfg, thinning=dataclasses.replace(depth_gen.cfg.thinning,
                                                                        max_points_per_voxel=3))
    gen = PseudoPointGenerator(cfg)
    ref = gen(pts, img, kitti_frame.calib)
    p, valid = _padded_points(pts, 100, 8)
    got = depth_static(gen, p, valid, img, kitti_frame.calib, 200000)
    assert bool(got.thinning_overflow)
    got = depth_static(gen, p, valid, img, kitti_frame.calib, 200000, sort_thinning=True)
    n = ref.pseudo_rows.shape[0]
    assert int(got.n_pseudo) == n and torch.equal(got.pseudo[:n], ref.pseudo_rows)


@pytest.mark.parametrize("seed", [0, 1])
def test_discard_static_equals_input_point_discard(eager_depth, seed):
    from cmfiou_core.depth.io import input_point_discard
    from cmfiou_core.engine.prelude import discard_static, in_range

    rows = eager_depth[2].pseudo_rows
    lo, hi = torch.tensor(RANGE[:3]), torch.tensor(RANGE[3:])
    p, valid = _padded(rows, 4000, seed)
    valid = valid & in_range(p, lo, hi)
    ref_in = rows[in_range(rows, lo, hi)]
    assert torch.equal(p[valid], ref_in)
    cap = p.shape[0] + 1000
    rnd = torch.rand(cap, generator=torch.Generator().manual_seed(11 + seed))
    ref = input_point_discard(ref_in, generator=torch.Generator().manual_seed(11 + seed))
    out, n = discard_static(p, valid, rnd)
    assert int(n) == ref.shape[0] > 1000 and torch.equal(out[:int(n)], ref) and not out[int(n):].any()


def test_discard_static_edge_cases():
    """No valid row; rows behind the sensor (x < 0: no slab, dropped); all rows in one slab; another rate."""
    from cmfiou_core.depth.io import input_point_discard
    from cmfiou_core.engine.prelude import discard_static

    g = torch.Generator().manual_seed(3)
    cases = [torch.zeros(0, 8), torch.cat([torch.rand(50, 8, generator=g) * -5, torch.rand(300, 8, generator=g) * 70]),
             torch.rand(400, 8, generator=g) * 5, torch.rand(999, 8, generator=g) * 80]
    for k, rows in enumerate(cases):
        for rate in (0.8, 0.3):
            p, valid = _padded(rows, 37, k)
            rnd = torch.rand(p.shape[0], generator=torch.Generator().manual_seed(k))
            out, n = discard_static(p, valid, rnd, rate=rate)
            ref = input_point_discard(rows, rate=rate, generator=torch.Generator().manual_seed(k))
            assert int(n) == ref.shape[0] and torch.equal(out[:int(n)], ref)
    out, n = discard_static(torch.zeros(5, 8), torch.zeros(5, dtype=torch.bool), torch.rand(5))
    assert int(n) == 0 and not out.any()


# ----------------------------------------------------------------------------------------------- the whole prelude
@pytest.fixture(scope="module")
def graph_pipe():
    """A graph-engine pipeline (random weights: only the stages before the backbone matter here)."""
    from cmfiou_core.pipeline import Pipeline

    return Pipeline.from_config(None, "none", "cpu", engine="graph")


def _eager_inputs(pipe, frame, image):
    """The eager pipeline's front (Pipeline.eager_front + the model's VFE) -> the backbone engine's padded inputs
    (EngineBackbone._gather_inputs), its anchor-mask points and the pseudo modality's presence."""
    from cmfiou_core.timing import StageTimer

    batch, _, _ = pipe.eager_front(frame, image, StageTimer(pipe.device, False))
    if batch is None:
        return None
    batch = pipe.model.vfe(batch)
    bb = pipe.model.backbone_3d
    V, sfx = bb._views(batch)
    ins = bb._gather_inputs(batch, 1, V, sfx)
    has_mm = any(batch["voxel_features_mm" + s].shape[0] > 0 for s in sfx)
    return ins, batch["points"][:, 1:3], has_mm


def _front(pipe):
    """A fresh StaticFront of ``pipe``, built as the pipeline builds its own."""
    from cmfiou_core.engine.prelude import StaticFront
    from cmfiou_core.pipeline import _identity_calib, frame_seed

    return StaticFront(pipe, pipe._frame_graph, lambda pts: frame_seed(pts, pipe.seed), _identity_calib)


def _prelude(front, frame, image):
    """The prelude on ``frame`` staged by ``front`` (the calibration read from its staging buffer, as the graphs)."""
    inp = front.inputs(frame, image)
    return front.prelude(inp["pts"], inp["cnt"], inp["img"], inp["rnd"], inp["cal"], inp["fov_hw"])


@pytest.mark.parametrize("mode", ["camera", "camera_other_calib", "lidar_only", "lidar_only_other_calib",
                                  "no_camera_model", "three_views"])
def test_prelude_equals_the_eager_front(graph_pipe, kitti_frame, other_calib_frame, mode):
    """Frame -> backbone inputs (raw and pseudo VFE features, coordinates, counts) and anchor-mask points, bit for
    bit against the eager pipeline's front: camera + LiDAR (the frame's own calibration, and another real one:
    every calibration number comes from the staged buffer); LiDAR-only with the camera's FOV (both calibrations);
    LiDAR-only without a camera model; the three official test views."""
    import dataclasses

    from cmfiou_core.engine.prelude import F_MM_VOX, F_PSEUDO, F_RAW_ROWS, F_RAW_VOX
    from cmfiou_core.model.model_config import OFFICIAL_X_TRANS

    pipe = graph_pipe
    frame = other_calib_frame if mode.endswith("other_calib") else kitti_frame
    image = frame.image
    views = pipe.views
    if not mode.startswith("camera") and mode != "three_views":
        image = None
    if mode == "no_camera_model":
        frame = dataclasses.replace(frame, calib=None, image=None)
    if mode == "three_views":
        pipe.views = OFFICIAL_X_TRANS.params()
    try:
        front = _front(pipe)
        ref, ref_xy, has_mm = _eager_inputs(pipe, frame, image)
        out, flags = _prelude(front, frame, image)
    finally:
        pipe.views = views
    f, c, n = out["raw"]
    rf, rc, rn = ref[""]
    assert int(n) == int(rn) > 1000 and torch.equal(f, rf) and torch.equal(c, rc)
    assert torch.equal(out["pts_xy"][out["pts_valid"]], ref_xy)
    assert int(flags[F_RAW_ROWS]) == int(out["pts_valid"].sum()) or mode == "three_views"
    assert int(flags[F_RAW_VOX]) > 0
    if image is not None:
        mf, mc, mn = out["mm"]
        rmf, rmc, rmn = ref["_mm"]
        assert has_mm and int(mn) == int(rmn) > 1000 and torch.equal(mf, rmf) and torch.equal(mc, rmc)
        assert int(flags[F_PSEUDO]) <= front.prelude.pseudo_capacity and int(flags[F_MM_VOX]) > 0
    else:
        assert out["mm"] == (None, None, None) and not has_mm


def test_prelude_is_sync_free_on_the_cuda_path(graph_pipe, kitti_frame, other_calib_frame, monkeypatch):
    """The prelude counted on its CUDA code path (opcount; ipbasic's GPU branches forced): no .item / .tolist /
    nonzero / bool index / host<->device copy once its constants exist (the first call builds them, as the CUDA
    graph's warm-up does), and the same output shapes for frames of different content and calibration (a new
    calibration is staged data, no new constant)."""
    import cmfiou_core.depth.ipbasic as ipb
    from cmfiou_core.opcount import OpCounter

    monkeypatch.setattr(ipb, "FORCE_GPU_PATHS", True)
    front = _front(graph_pipe)
    shapes = []
    for k, fr in enumerate([kitti_frame, _thinned(other_calib_frame, 3)]):
        inp = front.inputs(fr, fr.image)
        args = (inp["pts"], inp["cnt"], inp["img"], inp["rnd"], inp["cal"], inp["fov_hw"])
        if k == 0:
            front.prelude(*args)
        with OpCounter(cuda_paths=True) as oc:
            out, flags = front.prelude(*args)
        assert oc.n_syncs() == 0, oc.sync_sites()
        assert oc.n_ops() > 300
        shapes.append([tuple(t.shape) for t in (*out["raw"], *out["mm"], out["pts_xy"], out["pts_valid"], flags)])
    assert shapes[0] == shapes[1]


def _thinned(frame, step):
    import dataclasses

    return dataclasses.replace(frame, points=np.ascontiguousarray(frame.points[::step]))


# ----------------------------------------------------------------------------------------------- through FrameGraph
def _agree(a, b):
    from conftest import assert_detections_agree

    assert_detections_agree(a, b, min_count=3)


def test_graph_pipeline_overflow_sync_empty_modality_and_empty_frame(kitti_samples, caplog, monkeypatch):
    """The graph pipeline (StaticFront -> FrameGraph, CPU, demo checkpoint) against the eager one on a near crop of
    a real frame (one test: the CPU engine is slow to build and calibrate):
    - a frame with no point in range first: the eager note, before any capacity exists;
    - a pseudo-row capacity that overflows: a warning, capacities grown, the frame re-run: the eager detections;
    - calibration A then B (the same points and image, another real KITTI calibration) through the prelude's
      graphs (replay emulated on the CPU: the graph replayed for B holds the objects of A's capture): one capture,
      each frame the eager detections of its own calibration (which differ);
    - a frame whose depth stage makes no pseudo row (the pseudo modality empty on the device, where the eager path
      has no pseudo tensors): the same detections; it is counted on its CUDA code path (opcount): between the host
      staging (writes into page-locked buffers) and FrameGraph's result copy no sync of any kind, and that copy is
      the frame's only device->host copy;
    - the empty frame again, on calibrated capacities (the graph runs on nothing): the note."""
    import dataclasses
    import sys

    import cmfiou_core.depth.ipbasic as ipb
    import cmfiou_core.engine.prelude as prelude
    from cmfiou_core.opcount import OpCounter

    sys.path.insert(0, str(REPO / "bench"))
    from bench_pipeline import load_frames

    from cmfiou_core.pipeline import Pipeline

    (_, frame), = [f for f in load_frames([str(kitti_samples / "object" / "training")], 0, REPO / "data", 13)
                   if f[0].endswith("000009")]
    p = frame.points
    keep = (p[:, 0] > 0) & (p[:, 0] < 25) & (np.abs(p[:, 1]) < 10)
    crop = dataclasses.replace(frame, points=np.ascontiguousarray(p[keep]))
    far = dataclasses.replace(frame, points=np.ascontiguousarray(p + np.float32([200, 0, 0, 0])))
    a = Pipeline.from_config(None, "", "cpu")
    g = Pipeline.from_config(None, "", "cpu", engine="graph")
    ea, eg = a(far), g(far)
    assert len(eg) == 0 and eg.note == ea.note and "no LiDAR point inside the detection range" in ea.note
    assert not g.model.backbone_3d.calibrated
    g._front.prelude.pseudo_capacity = 4096
    ref_a = a(crop)
    with caplog.at_level("WARNING"):
        _agree(ref_a, g(crop))
    assert g._front.regrowths == 1 and "pseudo rows exceed the capacity" in caplog.text
    assert g._front.prelude.pseudo_capacity >= g._front.last_flags[1] > 4096
    crop_b = dataclasses.replace(crop, calib=_other_calib(kitti_samples, crop, "000000"))
    ref_b = a(crop_b)
    assert not np.array_equal(ref_a.boxes, ref_b.boxes)
    monkeypatch.setattr(prelude, "capture", lambda fn: (lambda r: (r, r.out))(_ReplayOnCPU(fn)))
    g._front.use_graph = True
    _agree(ref_a, g(crop))
    assert g._front.captures == 1
    _agree(ref_b, g(crop_b))
    assert g._front.captures == 1 and g._front.replays == 2
    g._front.use_graph = None
    for pipe in (a, g):
        pipe.depth.cfg = dataclasses.replace(pipe.depth.cfg, max_z=-10.0)   # every pseudo point filtered out
    ref = a(crop)
    monkeypatch.setattr(ipb, "FORCE_GPU_PATHS", True)
    ipb.ipbasic_complete(torch.zeros(8, 8))      # its GPU branches' constants (a CUDA graph's warm-up builds them)
    with OpCounter(cuda_paths=True) as oc:
        got = g(crop)
    monkeypatch.setattr(ipb, "FORCE_GPU_PATHS", None)
    _agree(ref, got)
    device = [s for s in oc.syncs if s[0] not in ("front.h2d", "frame.host")]
    assert [(k, op) for _, k, op, _ in device] == [("d2h", "Tensor.cpu")], oc.sync_sites()
    assert "frame.py" in device[0][3]
    # front.h2d writes host arrays into page-locked buffers (torch.from_numpy counts as a 'lift_fresh'): host only
    assert {s[2] for s in oc.syncs if s[0] == "front.h2d"} <= {"aten.lift_fresh", "Tensor.numpy"}, oc.sync_sites()
    assert oc.n_ops("front.device") > 300 and oc.n_ops() > 5000
    assert g._front.last_flags[1] == 0 and g._front.last_flags[5] == 0
    eg = g(far)
    assert len(eg) == 0 and eg.note == ea.note and g.model.backbone_3d.calibrated


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_graph_front_replays_one_capture_across_calibrations_on_cuda(kitti_samples):
    """CUDA: frames differing only in their calibration (a near crop of a real frame with its own and another real
    KITTI calibration, alternating) replay the prelude graph captured on the first graphed frame (captures stays
    1), and each gives the eager CUDA pipeline's detections of its calibration."""
    import dataclasses
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    from bench_pipeline import load_frames

    from cmfiou_core.pipeline import Pipeline

    (_, frame), = [f for f in load_frames([str(kitti_samples / "object" / "training")], 0, REPO / "data", 13)
                   if f[0].endswith("000009")]
    p = frame.points
    keep = (p[:, 0] > 0) & (p[:, 0] < 25) & (np.abs(p[:, 1]) < 10)     # the CPU test's near crop
    frame = dataclasses.replace(frame, points=np.ascontiguousarray(p[keep]))
    frame_b = dataclasses.replace(frame, calib=_other_calib(kitti_samples, frame, "000000"))
    a = Pipeline.from_config(None, "", "cuda")
    g = Pipeline.from_config(None, "", "cuda", engine="graph")
    refs = [a(frame), a(frame_b)]
    assert not np.array_equal(refs[0].boxes, refs[1].boxes)
    _agree(refs[0], g(frame))               # sizes the backbone's capacities (no graph yet)
    _agree(refs[0], g(frame))               # the first graphed frame: the prelude's one capture
    captures = g._front.captures
    assert captures >= 1
    for k in range(4):
        _agree(refs[(k + 1) % 2], g(frame_b if k % 2 == 0 else frame))
    assert g._front.captures == captures and g._front.replays >= 5


def test_prelude_output_does_not_depend_on_the_capacities(graph_pipe, kitti_frame):
    """One answer per frame: the same frame through larger point and pseudo-row capacities (as after other frames
    grew them) gives the identical backbone inputs, anchor-mask points and flags; the discard's draws are a
    function of the frame (frame_seed), not of the capacity."""
    front = _front(graph_pipe)
    small, fs = _prelude(front, kitti_frame, kitti_frame.image)
    front.point_capacity = 1 << 18
    front.prelude.pseudo_capacity = 200704
    big, fb = _prelude(front, kitti_frame, kitti_frame.image)
    assert torch.equal(fs, fb)
    for mod in ("raw", "mm"):
        assert all(torch.equal(x, y) for x, y in zip(small[mod], big[mod]))
    n = small["pts_valid"].shape[0]
    assert torch.equal(small["pts_xy"][small["pts_valid"]], big["pts_xy"][big["pts_valid"]])
    assert not big["pts_valid"][n:].any()


class _ReplayOnCPU:
    """Stand-in for a CUDA graph on this GPU-less host: ``replay()`` re-runs the captured function and writes its
    results into the tensors the capture returned (a graph's static outputs), so code that replays graphs can be
    checked for reading the right static buffers."""

    def __init__(self, fn):
        self.fn = fn
        self.out = fn()

    def replay(self):
        _copy_into(self.out, self.fn())


def _copy_into(dst, src):
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    elif isinstance(dst, dict):
        for k in dst:
            _copy_into(dst[k], src[k])
    elif isinstance(dst, (tuple, list)):
        for a, b in zip(dst, src):
            _copy_into(a, b)
    else:
        assert dst is None and src is None


def test_prelude_graph_replay_reads_the_frames_own_inputs(graph_pipe, kitti_frame, other_calib_frame, monkeypatch):
    """StaticFront's two-part prelude replay (part a, the host's random draws, part b on part a's static outputs)
    with graph replay emulated on the CPU (the replayed functions hold the objects of the capture's frame, as a
    graph holds its tensors): frames of different content and calibration staged into the same input buffers give,
    under one graph key, replay after replay, exactly the prelude's direct results for each frame."""
    import cmfiou_core.engine.prelude as prelude

    monkeypatch.setattr(prelude, "capture", lambda fn: (lambda g: (g, g.out))(_ReplayOnCPU(fn)))
    front = _front(graph_pipe)
    pre = front.prelude
    frames = [kitti_frame, _thinned(kitti_frame, 2), other_calib_frame, kitti_frame]
    mm = []
    for k, fr in enumerate(frames):
        direct = _prelude(_front(graph_pipe), fr, fr.image)
        inp = front.inputs(fr, fr.image, with_rnd=False)
        box = {}
        out = front._replay(front.graph_key(inp),
                            lambda inp=inp: pre.part_a(inp["pts"], inp["cnt"], inp["img"], inp["cal"], None),
                            lambda: box.setdefault("rnd", front.rnd(fr)),
                            lambda st, box=box: pre.part_b(st, box["rnd"]))
        assert torch.equal(out[1], direct[1])
        for mod in ("raw", "mm"):
            assert all(torch.equal(x, y) for x, y in zip(out[0][mod], direct[0][mod]))
        assert front.captures == 1 and front.replays == k + 1
        mm.append(out[0]["mm"][0].clone())
    assert int(out[1][0]) > 0
    # the calibration reached the replay: same points and image, another calibration -> other pseudo features
    assert torch.equal(mm[0], mm[3]) and not torch.equal(mm[0], mm[2])


def test_graph_key_and_calibration_buffer_do_not_depend_on_the_calibration(graph_pipe, kitti_frame,
                                                                            other_calib_frame):
    """Two frames that differ only in their calibration: the same prelude graph key, and their calibration numbers
    in the same device buffer (the tensors a graph reads), holding each frame's own values -- the eager stages'
    (the depth generator's matrices and lifting intrinsics, the backbone's calib_tensors). The image size, a
    LiDAR-only frame and the test views stay in the key."""
    import dataclasses

    from cmfiou_core.engine.backbone import calib_tensors
    from cmfiou_core.model.model_config import OFFICIAL_X_TRANS

    front = _front(graph_pipe)
    gen = graph_pipe.depth
    ia = front.inputs(kitti_frame, kitti_frame.image, with_rnd=False)
    key = front.graph_key(ia)
    ptr = {f: getattr(ia["cal"], f).data_ptr() for f in ("V2R", "P2", "R2V", "intr", "m_rect", "p2_t")}
    for fr in (other_calib_frame, kitti_frame):
        inp = front.inputs(fr, fr.image, with_rnd=False)
        assert front.graph_key(inp) == key
        cal = inp["cal"]
        assert {f: getattr(cal, f).data_ptr() for f in ptr} == ptr
        ref = gen._mats(fr.calib, "cpu")
        assert all(torch.equal(a, b) for a, b in zip((cal.V2R, cal.P2, cal.R2V), ref))
        assert torch.equal(cal.intr, gen._intrinsics(fr.calib, "cpu"))
        bb = calib_tensors([fr.calib], "cpu")
        assert torch.equal(cal.m_rect, bb["m_rect"]) and torch.equal(cal.p2_t, bb["p2_t"])
        if fr is other_calib_frame:
            assert not torch.equal(cal.P2, gen._mats(kitti_frame.calib, "cpu")[1])
    h, w = kitti_frame.image.shape[:2]
    small = dataclasses.replace(other_calib_frame, image=kitti_frame.image[:h - 10, :w - 20],
                                calib=other_calib_frame.calib.with_image_size(w - 20, h - 10))
    assert front.graph_key(front.inputs(small, small.image, with_rnd=False)) != key
    assert front.graph_key(front.inputs(kitti_frame, None, with_rnd=False)) != key
    views = graph_pipe.views
    graph_pipe.views = OFFICIAL_X_TRANS.params()
    try:
        assert front.graph_key(front.inputs(kitti_frame, kitti_frame.image, with_rnd=False)) != key
    finally:
        graph_pipe.views = views


def test_staging_buffers_persist_per_shape(graph_pipe):
    """A frame of another image size gets its own persistent input buffer; the buffer of the first size (which its
    CUDA graphs read) is the same tensor when that size comes back, and no graph is dropped on the way."""
    front = _front(graph_pipe)
    front._graphs["sentinel"] = object()            # stands for a captured bucket
    a = front._buffer("image", (375, 1242, 3), torch.uint8, False)
    b = front._buffer("image", (370, 1224, 3), torch.uint8, False)
    assert b is not a and tuple(b.shape) == (370, 1224, 3)
    assert front._buffer("image", (375, 1242, 3), torch.uint8, False) is a
    assert "sentinel" in front._graphs
