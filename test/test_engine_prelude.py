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
