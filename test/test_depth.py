"""Depth completion + pseudo points (cmfiou_core.depth) on the real KITTI sample frames and small synthetic cases."""
import argparse
import glob
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cmfiou_core.calib import Calibration, CalibrationError
from cmfiou_core.config import ConfigError
from cmfiou_core.depth import (DepthConfig, PseudoPointGenerator, VelodyneDepthError, input_point_discard,
                               ipbasic_complete, la_sampling2_order, read_velodyne_depth, write_velodyne_depth)
from cmfiou_core.depth.config import IPBasicConfig, ThinningConfig
from cmfiou_core.depth.ipbasic import dilate, median5
from cmfiou_core.depth.projection import calib_matrices, fov_flag, project_points, sparse_depth_map

DEPTH_YAML = """
depth:
  method: ipbasic
  crop_official: false
  fov_filter_raw: true
  min_depth: 0.01
  max_z: 1.0
  thinning:
    enabled: true
    theta_min: 1.5
    voxel_size: [200.0, 0.002, 0.002]
    voxel_range: [-100.0, -5.0, -5.0, 100.0, 5.0, 5.0]
    max_points_per_voxel: 100
  ipbasic:
    max_depth: 100.0
    dilation_kernel: diamond5
    extrapolate: false
    blur: bilateral
  penet:
    checkpoint: null
    pad_multiple: 32
  discard:
    rate: 0.8
    bin_num: 10
    max_dis: 60.0
  timing: true
"""


# ----------------------------------------------------------------------------------------------- helpers / fixtures
def _frames(root: Path):
    """(name, velodyne path, image path, calib) for every real frame: 13 object frames, 000134, 8 raw frames."""
    out = []
    obj = root / "object" / "training"
    for fid in (root / "object" / "ImageSets" / "all.txt").read_text().split():
        out.append((fid, obj / "velodyne" / f"{fid}.bin", obj / "image_2" / f"{fid}.png",
                    Calibration.from_kitti_object_file(obj / "calib" / f"{fid}.txt")))
    red = root / "object" / "training_fov_reduced"
    out.append(("000134r", red / "velodyne" / "000134.bin", red / "image_2" / "000134.png",
                Calibration.from_kitti_object_file(red / "calib" / "000134.txt")))
    rc = Calibration.from_kitti_raw_dir(root / "raw" / "2011_09_26")
    for p in sorted(glob.glob(str(root / "raw" / "2011_09_26" / "*" / "velodyne_points" / "data" / "*.bin"))):
        out.append(("raw" + Path(p).stem[-2:], Path(p), Path(p.replace("velodyne_points", "image_02")[:-4] + ".png"),
                    rc))
    return out


def _load(vp, ip):
    pts = torch.from_numpy(np.fromfile(vp, dtype=np.float32).reshape(-1, 4))
    img = torch.from_numpy(np.array(Image.open(ip).convert("RGB")))
    return pts, img


@pytest.fixture(scope="module")
def frames(kitti_samples):
    return _frames(kitti_samples)


def _labels(path):
    out = []
    for line in Path(path).read_text().splitlines():
        f = line.split()
        if len(f) == 15:
            out.append({"type": f[0], "trunc": float(f[1]), "occ": int(f[2]), "bbox": [float(x) for x in f[4:8]],
                        "hwl": [float(x) for x in f[8:11]], "xyz": [float(x) for x in f[11:14]], "ry": float(f[14])})
    return out


def _in_box_rect(rect: np.ndarray, lab) -> np.ndarray:
    """Points (rect camera frame) inside a KITTI label box (bottom-centre location, y down, yaw ry about y)."""
    h, w, l = lab["hwl"]
    d = rect - np.asarray(lab["xyz"])
    c, s = math.cos(lab["ry"]), math.sin(lab["ry"])
    lx = c * d[:, 0] - s * d[:, 2]
    lz = s * d[:, 0] + c * d[:, 2]
    return (np.abs(lx) <= l / 2) & (np.abs(lz) <= w / 2) & (d[:, 1] <= 0) & (d[:, 1] >= -h)


# ----------------------------------------------------------------------------------------------- config
def test_config_yaml_block_and_errors(tmp_path):
    import yaml

    from cmfiou_core.config import load_yaml

    f = tmp_path / "m.yaml"
    f.write_text(DEPTH_YAML)
    data = load_yaml(f)
    cfg = DepthConfig.from_dict(data["depth"], str(f))
    assert cfg == DepthConfig()  # the documented block equals the defaults
    assert DepthConfig.from_dict(None) == DepthConfig()
    bad = yaml.safe_load(DEPTH_YAML)["depth"]
    bad["ipbasic"]["dilaton_kernel"] = "full5"
    with pytest.raises(ConfigError, match=r"unknown key\(s\) under 'depth.ipbasic': dilaton_kernel"):
        DepthConfig.from_dict(bad, "m.yaml")
    with pytest.raises(ConfigError, match="'depth.method' must be one of"):
        DepthConfig.from_dict({"method": "sparse2dense"})
    with pytest.raises(ConfigError, match="voxel_size"):
        DepthConfig.from_dict({"thinning": {"voxel_size": [1, 0, 1]}})
    with pytest.raises(ConfigError, match="checkpoint is not set"):
        PseudoPointGenerator(DepthConfig.from_dict({"method": "penet"}))


# ----------------------------------------------------------------------------------------------- projection
def test_projection_matches_float64_reference(frames):
    """Torch float32 projection / FOV / nearest-per-pixel depth agree with an independent per-point float64 numpy
    computation on every real frame (all three calibration days and the raw drive)."""
    for name, vp, ip, cal in frames:
        pts, img = _load(vp, ip)
        H, W = img.shape[:2]
        V2R, P2 = calib_matrices(cal, "cpu")
        uv, d = project_points(pts[:, :3], V2R, P2)
        fov = fov_flag(uv, d, H, W)
        sp = sparse_depth_map(uv, d, fov, H, W).numpy()
        # reference: P2 @ R0 @ Tr @ [x y z 1] in float64, per point
        x64 = pts[:, :3].numpy().astype(np.float64)
        Tr = np.vstack([cal.Tr_velo_to_cam, [0, 0, 0, 1]])
        R0 = np.eye(4)
        R0[:3, :3] = cal.R0_rect
        hom = (cal.P2 @ R0 @ Tr @ np.c_[x64, np.ones(len(x64))].T).T
        uv_r, d_r = hom[:, :2] / hom[:, 2:3], hom[:, 2] - cal.P2[2, 3]
        fov_r = (uv_r[:, 0] >= 0) & (uv_r[:, 0] < W) & (uv_r[:, 1] >= 0) & (uv_r[:, 1] < H) & (d_r >= 0)
        np.testing.assert_allclose(uv.numpy()[fov_r], uv_r[fov_r], atol=2e-3)
        np.testing.assert_allclose(d.numpy()[fov_r], d_r[fov_r], atol=1e-4)
        # FOV flags equal except for points within float32 rounding of a border
        near_border = (np.abs(uv_r[:, 0]) < 1e-3) | (np.abs(uv_r[:, 0] - W) < 1e-3) | \
                      (np.abs(uv_r[:, 1]) < 1e-3) | (np.abs(uv_r[:, 1] - H) < 1e-3) | (np.abs(d_r) < 1e-4)
        assert np.array_equal(fov.numpy()[~near_border], fov_r[~near_border]), name
        # nearest point per pixel
        ref = np.full(H * W, np.inf)
        ui, vi = np.floor(uv_r[fov_r]).astype(np.int64).T
        np.minimum.at(ref, vi * W + ui, d_r[fov_r])
        ref = np.where(np.isinf(ref), 0, ref).reshape(H, W)
        diff = np.abs(sp - ref)
        # float32 vs float64 may move a point whose u/v is within ~1e-3 px of a pixel edge into the neighbour
        assert (diff > 1e-3).mean() < 2e-4, (name, (diff > 1e-3).sum())
        assert (sp > 0).sum() == pytest.approx((ref > 0).sum(), rel=2e-3)


# ----------------------------------------------------------------------------------------------- IP-Basic
def test_morphology_matches_scipy():
    from scipy import ndimage

    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 40, 57, generator=g) * (torch.rand(1, 1, 40, 57, generator=g) < 0.1) * 80
    a = x[0, 0].numpy().astype(np.float64)
    fp = {"full3": np.ones((3, 3)), "full5": np.ones((5, 5)), "full7": np.ones((7, 7)),
          "cross3": np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]]),
          "cross5": np.array([[0, 0, 1, 0, 0]] * 2 + [[1] * 5] + [[0, 0, 1, 0, 0]] * 2),
          "cross7": np.array([[0, 0, 0, 1, 0, 0, 0]] * 3 + [[1] * 7] + [[0, 0, 0, 1, 0, 0, 0]] * 3),
          "diamond5": (np.abs(np.arange(5)[:, None] - 2) + np.abs(np.arange(5) - 2)) <= 2,
          "diamond7": (np.abs(np.arange(7)[:, None] - 3) + np.abs(np.arange(7) - 3)) <= 3}
    for name, f in fp.items():
        ref = ndimage.grey_dilation(a, footprint=f.astype(bool), mode="constant", cval=-np.inf)
        np.testing.assert_allclose(dilate(x, name)[0, 0].numpy(), ref, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(median5(x)[0, 0].numpy(), ndimage.median_filter(a, size=5, mode="nearest"),
                               atol=1e-6)


def _holdout_errors(frames, cfg=IPBasicConfig(), frac=0.2):
    """Per frame: hold out a seeded 20% of the projected LiDAR pixels, complete the rest, return the errors at the
    held-out pixels (and those of a nearest-neighbour fill, a trivial baseline)."""
    from scipy.ndimage import distance_transform_edt

    out = []
    for i, (name, vp, ip, cal) in enumerate(frames):
        pts, img = _load(vp, ip)
        H, W = img.shape[:2]
        V2R, P2 = calib_matrices(cal, "cpu")
        uv, d = project_points(pts[:, :3], V2R, P2)
        sp = sparse_depth_map(uv, d, fov_flag(uv, d, H, W), H, W).reshape(-1)
        g = torch.Generator().manual_seed(1000 + i)
        idx = torch.nonzero(sp > 0.1).squeeze(1)
        sel = idx[torch.randperm(idx.numel(), generator=g)[: int(frac * idx.numel())]]
        inp = sp.clone()
        inp[sel] = 0
        dense = ipbasic_complete(inp.view(H, W), cfg).reshape(-1)
        a = inp.view(H, W).numpy()
        _, (r, c) = distance_transform_edt(a <= 0.1, return_indices=True)
        nn = torch.from_numpy(a[r, c]).reshape(-1)
        out.append((name, dense[sel] - sp[sel], nn[sel] - sp[sel]))
    return out


def test_ipbasic_holdout_accuracy(frames):
    """Classical completion scored at held-out real LiDAR pixels (no dense GT in the samples).

    Measured (22 real frames: 13 object + 000134 + 8 raw; 78,486 held-out pixels; default config = IP-Basic fast,
    diamond 5x5, bilateral, no extrapolation): MAE 0.597 m, RMSE 3.334 m, median |e| 0.032 m; worst frames MAE
    1.063 m (000134, cropped scan) / RMSE 4.87 m; a nearest-neighbour fill gives MAE 0.611 m / RMSE 3.412 m. The
    RMSE is far above IP-Basic's published KITTI numbers (MAE 0.30 m, RMSE 1.29 m) because this target is harsher:
    raw LiDAR returns incl. the mixed fore/background points at depth edges that KITTI's accumulated,
    outlier-filtered ground truth removes, the full image incl. the sparse top rows, and an input thinned to 80 %.
    Bounds: aggregate MAE < 0.75 m (+26 %), RMSE < 4.0 m (+20 %); per frame MAE < 1.3 m, RMSE < 6.0 m; median
    |e| < 0.10 m (3x); and not worse than the nearest-neighbour fill. (Deterministic: seeded hold-out.)
    """
    res = _holdout_errors(frames)
    e = torch.cat([r[1] for r in res])
    nn = torch.cat([r[2] for r in res])
    mae, rmse = e.abs().mean().item(), e.pow(2).mean().sqrt().item()
    print(f"\n[ipbasic hold-out] frames={len(res)} pixels={e.numel()} MAE={mae:.3f} m RMSE={rmse:.3f} m "
          f"median|e|={e.abs().median().item():.3f} m | NN fill MAE={nn.abs().mean().item():.3f} "
          f"RMSE={nn.pow(2).mean().sqrt().item():.3f}")
    for name, ef, _ in res:
        print(f"  {name}: MAE={ef.abs().mean().item():.3f} RMSE={ef.pow(2).mean().sqrt().item():.3f} n={ef.numel()}")
        assert ef.abs().mean() < 1.3 and ef.pow(2).mean().sqrt() < 6.0, name
    assert mae < 0.75 and rmse < 4.0
    assert e.abs().median() < 0.10
    assert mae <= nn.abs().mean().item()


# ----------------------------------------------------------------------------------------------- thinning
def _la_sampling2_reference(xyz: np.ndarray, cfg: ThinningConfig):
    """Per-point float64 python reference of la_sampling2 + spconv voxel semantics (first-arrival voxel order,
    first `max_points_per_voxel` points per voxel, min-z winner, first on ties). Returns kept indices in order."""
    lo, size = np.array(cfg.voxel_range[:3]), np.array(cfg.voxel_size)
    grid = np.round((np.array(cfg.voxel_range[3:]) - lo) / size).astype(int)
    vox = {}
    for i, (x, y, z) in enumerate(xyz):
        r = math.sqrt(x * x + y * y + z * z)
        th = math.acos(z / r)
        ph = math.atan(y / x)
        if not th > cfg.theta_min:
            continue
        c = np.floor((np.array([r, th, ph]) - lo) / size).astype(int)
        if np.any(c < 0) or np.any(c >= grid):
            continue
        lst = vox.setdefault(tuple(c), [])
        if len(lst) < cfg.max_points_per_voxel:
            lst.append(i)
    return [min(v, key=lambda j: (xyz[j, 2], j)) for v in vox.values()]  # dict keeps first-arrival order


def test_la_sampling2_matches_reference():
    g = np.random.default_rng(0)
    n = 4000
    # points in front of the sensor, below it (theta > 1.5), quantised so voxels collect several points and ties
    xyz = np.c_[g.uniform(2, 30, n), g.uniform(-5, 5, n), np.round(g.uniform(-2.0, 0.0, n), 1)]
    xyz = xyz.astype(np.float32).astype(np.float64)
    for cfg in (ThinningConfig(), ThinningConfig(voxel_size=(200.0, 0.05, 0.05), max_points_per_voxel=3)):
        ref = _la_sampling2_reference(xyz, cfg)
        valid = torch.ones(n, dtype=torch.bool)
        valid[::97] = False  # masked-out entries must be ignored
        order, cnt = la_sampling2_order(torch.from_numpy(xyz).float(), valid, cfg)
        ref_valid = _la_sampling2_reference(np.where(valid.numpy()[:, None], xyz, np.nan), cfg)
        got = order[: int(cnt)].tolist()
        assert got == ref_valid, cfg
        assert len(ref) > len(ref_valid) > 0


# ----------------------------------------------------------------------------------------------- generator
@pytest.fixture(scope="module")
def gen():
    return PseudoPointGenerator(DepthConfig())


def test_generator_outputs_and_cars(kitti_samples, frames, gen):
    """Pseudo points land on the labelled cars: inside each well-observed car box (>= 50 raw points, occlusion <= 1,
    truncation < 0.3) the pseudo points outnumber the raw points >= 4x, >= 95 % of them re-project into the car's
    2D box, >= 99 % carry the colour of the pixel they re-project to, and their mean colour lies within 0.6 standard
    deviations of the 2D-box region's colour, per channel. Measured on 21 cars: ratio 4.8-10.1, in-2D-box 100 %,
    same pixel 100 %, colour gap <= 0.45 std."""
    obj = kitti_samples / "object" / "training"
    checked = 0
    for name, vp, ip, cal in frames[:13]:
        pts, img = _load(vp, ip)
        res = gen(pts, img, cal)
        raw, ps = res.raw_rows.numpy(), res.pseudo_rows.numpy()
        assert raw.shape[1] == ps.shape[1] == 8 and np.isfinite(raw).all() and np.isfinite(ps).all()
        assert (raw[:, 7] == 2).all() and (ps[:, 7] == 1).all() and (ps[:, 3] == 0).all() and (raw[:, 4:7] == 0).all()
        assert (ps[:, 2] < 1.0).all() and ps[:, 4:7].max() <= 85.0 + 1e-4
        assert set(res.timings_ms) == {"projection", "completion", "lifting", "thinning", "total"}
        assert ps.shape[0] > 3 * raw.shape[0]
        rect_ps = cal.lidar_to_rect(ps[:, :3].astype(np.float64))
        rect_raw = cal.lidar_to_rect(raw[:, :3].astype(np.float64))
        uv, _ = cal.rect_to_img(rect_ps)
        im = img.numpy().astype(np.float64)
        for lab in _labels(obj / "label_2" / f"{name}.txt"):
            if lab["type"] != "Car" or lab["occ"] > 1 or lab["trunc"] >= 0.3:
                continue
            n_raw = int(_in_box_rect(rect_raw, lab).sum())
            if n_raw < 50:
                continue
            inside = _in_box_rect(rect_ps, lab)
            n_ps = int(inside.sum())
            x1, y1, x2, y2 = lab["bbox"]
            u, v = uv[inside, 0], uv[inside, 1]
            in2d = ((u >= x1 - 2) & (u <= x2 + 2) & (v >= y1 - 2) & (v <= y2 + 2)).mean()
            ui, vi = np.clip(np.round(u).astype(int), 0, im.shape[1] - 1), np.clip(np.round(v).astype(int), 0,
                                                                                   im.shape[0] - 1)
            same_px = (np.abs(im[vi, ui] / 3 - ps[inside, 4:7]) < 1e-3).all(1).mean()
            region = im[int(y1):int(y2) + 1, int(x1):int(x2) + 1].reshape(-1, 3)
            col_gap = np.abs(ps[inside, 4:7].mean(0) * 3 - region.mean(0)) / region.std(0)
            print(f"  {name} car raw={n_raw} pseudo={n_ps} ratio={n_ps / n_raw:.1f} in2d={in2d:.3f} "
                  f"same_px={same_px:.3f} colour_gap_in_std={np.round(col_gap, 2).tolist()}")
            assert n_ps >= 4 * n_raw
            assert in2d >= 0.95 and same_px >= 0.99
            assert (col_gap < 0.6).all()
            checked += 1
    print(f"[pseudo/cars] checked {checked} cars")
    assert checked >= 10


def test_generator_crop_and_fov_options(frames):
    name, vp, ip, cal = frames[8]  # 000008, 1242x375
    pts, img = _load(vp, ip)
    full = PseudoPointGenerator(DepthConfig())(pts, img, cal)
    crop = PseudoPointGenerator(DepthConfig(crop_official=True))(pts, img, cal)
    uv, d = cal.lidar_to_img(crop.raw_rows[:, :3].numpy().astype(np.float64))
    assert (uv[:, 0] < 1216).all() and (uv[:, 1] < 352).all()
    assert crop.raw_rows.shape[0] < full.raw_rows.shape[0]
    allraw = PseudoPointGenerator(DepthConfig(fov_filter_raw=False, thinning=ThinningConfig(enabled=False)))(
        pts, img, cal)
    assert allraw.raw_rows.shape[0] == pts.shape[0]
    assert allraw.pseudo_rows.shape[0] > full.pseudo_rows.shape[0]
    np.testing.assert_allclose(allraw.raw_rows[:, 3].numpy(), pts[:, 3].numpy() * 10, rtol=1e-6)


def test_generator_errors(frames, gen, tmp_path):
    name, vp, ip, cal = frames[8]
    pts, img = _load(vp, ip)
    with pytest.raises(CalibrationError, match="1200x375 but the calibration is for 1242x375"):
        gen(pts, img[:, :1200], cal.with_image_size(1242, 375))
    with pytest.raises(ValueError, match="uint8"):
        gen(pts, img.float(), cal)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        gen(pts[:, :3], img, cal)
    with pytest.raises(CalibrationError):
        gen(pts, img, {"P2": cal.P2})
    with pytest.raises(ValueError, match="crop_official needs"):
        PseudoPointGenerator(DepthConfig(crop_official=True))(pts, img[:300], cal)
    bad = tmp_path / "bad.txt"
    bad.write_text(cal.to_kitti_object_text().replace("R0_rect: 9", "R0_rect: 2"))
    with pytest.raises(CalibrationError, match="not a rotation"):
        Calibration.from_kitti_object_file(bad)


# ----------------------------------------------------------------------------------------------- files / discard
def test_velodyne_depth_roundtrip_and_validation(frames, gen, tmp_path):
    name, vp, ip, cal = frames[8]
    pts, img = _load(vp, ip)
    res = gen(pts, img, cal)
    f = write_velodyne_depth(tmp_path / "000008.npy", res.all_rows)
    arr = read_velodyne_depth(f)
    assert arr.dtype == np.float16 and arr.shape == (res.raw_rows.shape[0] + res.pseudo_rows.shape[0], 8)
    ref = res.all_rows.numpy()
    np.testing.assert_array_equal(arr, ref.astype(np.float16))
    # float16 quantisation: <= 2^-11 relative (about 3 cm at 70 m)
    assert np.all(np.abs(arr[:, :3].astype(np.float32) - ref[:, :3]) <= np.abs(ref[:, :3]) * 2 ** -11 + 1e-6)
    assert (arr[: res.raw_rows.shape[0], 7] == 2).all() and (arr[res.raw_rows.shape[0]:, 7] == 1).all()
    for bad, match in ((np.zeros((3, 7), np.float16), "shape"), (np.zeros((3, 8), np.float32), "float16"),
                       (np.full((3, 8), np.nan, np.float16), "NaN"), (np.zeros((3, 8), np.float16), "flag")):
        p = tmp_path / f"bad_{match}.npy"
        np.save(p, bad)
        with pytest.raises(VelodyneDepthError, match=match):
            read_velodyne_depth(p)
    with pytest.raises(VelodyneDepthError, match="not found"):
        read_velodyne_depth(tmp_path / "none.npy")
    with pytest.raises(VelodyneDepthError, match="overflow"):
        write_velodyne_depth(tmp_path / "o.npy", np.full((2, 8), 1e6))


def _discard_reference_counts(x: np.ndarray, rate=0.8, bin_num=10, max_dis=60.0):
    """Expected number kept per slab (official partition logic, written independently)."""
    N, inter, retain = len(x), max_dis / bin_num, 1 - rate
    counts = [int(((x >= inter * i) & ((x < inter * (i + 1)) | (i == bin_num - 1))).sum()) for i in range(bin_num)]
    acc, pos, dist = 0, bin_num - 1, 0
    for i in reversed(range(bin_num)):
        acc += counts[i]
        if (acc + i * counts[i]) / N < retain:
            pos, dist = i, acc
    per = int((int(N * retain) - dist) / (max(pos, 0) + 0.0001))
    return [c if i >= pos else min(c, per) for i, c in enumerate(counts)], counts


def test_input_point_discard(frames, gen):
    name, vp, ip, cal = frames[8]
    pts, img = _load(vp, ip)
    ps = gen(pts, img, cal).pseudo_rows
    keep_ref, counts = _discard_reference_counts(ps[:, 0].numpy().astype(np.float64))
    out = input_point_discard(ps, generator=torch.Generator().manual_seed(3))
    out2 = input_point_discard(ps, generator=torch.Generator().manual_seed(3))
    out3 = input_point_discard(ps, generator=torch.Generator().manual_seed(4))
    assert torch.equal(out, out2) and not torch.equal(out, out3)
    x = out[:, 0].numpy()
    got = [int(((x >= 6 * i) & ((x < 6 * (i + 1)) | (i == 9))).sum()) for i in range(10)]
    assert got == keep_ref
    assert abs(out.shape[0] - 0.2 * ps.shape[0]) < 0.02 * ps.shape[0]
    # far slabs first (official concatenation order); every kept row is an input row
    slab = np.minimum(np.floor(x / 6), 9)
    assert np.all(np.diff(slab) <= 0)
    assert torch.isin(out[:, :3].contiguous().view(-1), ps[:, :3].contiguous().view(-1)).all()
    print(f"\n[discard] {ps.shape[0]} -> {out.shape[0]} per slab {got} (of {counts})")


# ----------------------------------------------------------------------------------------------- PENet
def _tiny_batch(H=64, W=64, seed=0):
    from cmfiou_core.depth.penet import position_grid

    g = torch.Generator().manual_seed(seed)
    rgb = torch.rand(2, 3, H, W, generator=g) * 255
    gt = 5 + 20 * torch.rand(2, 1, H, W, generator=g)
    d = gt * (torch.rand(2, 1, H, W, generator=g) < 0.05)
    K = torch.tensor([[60.0, 0, W / 2], [0, 60.0, H / 2], [0, 0, 1]]).expand(2, 3, 3)
    return {"rgb": rgb, "d": d, "gt": gt, "K": K, "position": position_grid(H, W).expand(2, -1, -1, -1)}


@pytest.fixture(scope="module")
def penet():
    from cmfiou_core.depth.penet import build_penet

    torch.manual_seed(0)
    return build_penet()


def test_penet_forward_and_train_step(penet):
    from cmfiou_core.depth.train_penet import make_optimizer, masked_mse, train_step

    b = _tiny_batch()
    penet.eval()
    with torch.no_grad():
        out = penet(b["rgb"], b["d"], b["position"], b["K"])
    assert out.shape == (2, 1, 64, 64) and torch.isfinite(out).all()
    opt = make_optimizer(penet, lr=1e-3)
    l0 = train_step(penet, {k: b[k] for k in ("rgb", "d", "gt", "K")}, opt)
    penet.train()
    with torch.no_grad():
        l1 = float(masked_mse(penet(b["rgb"], b["d"], b["position"], b["K"]), b["gt"]))
    print(f"\n[penet] tiny synthetic train step: loss {l0:.3f} -> {l1:.3f}")
    assert math.isfinite(l0) and l1 < l0


def test_penet_checkpoint_loading(penet, tmp_path):
    from cmfiou_core.depth.penet import CheckpointError, PENetCompleter, build_penet, load_penet_checkpoint

    # public pe.pth.tar layout: DataParallel 'module.' prefixes, training-only layers, args + metrics.Result objects
    sd = {"module." + k: v.clone() for k, v in penet.state_dict().items()}
    sd["module.dimhalf_s2.0.weight"] = torch.zeros(64, 128, 1, 1)
    sd["module.att_12.0.weight"] = torch.zeros(2, 128, 3, 3)
    metrics = types.ModuleType("metrics")

    class Result:  # stands for the public metrics.Result
        def __init__(self):
            self.rmse = 0.7

    Result.__module__, Result.__qualname__ = "metrics", "Result"
    metrics.Result = Result
    sys.modules["metrics"] = metrics
    try:
        ck = {"model": sd, "epoch": 3, "args": argparse.Namespace(network_model="pe", dilation_rate=2),
              "best_result": Result(), "optimizer": {}}
        torch.save(ck, tmp_path / "pe.pth.tar")
    finally:
        del sys.modules["metrics"]
    fresh = build_penet()
    info = load_penet_checkpoint(fresh, tmp_path / "pe.pth.tar")
    assert sorted(info["ignored"]) == ["att_12.0.weight", "dimhalf_s2.0.weight"]
    for k, v in penet.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k

    # anything executable / unknown is refused with a clear error
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": {}, "x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_penet_checkpoint(fresh, tmp_path / "evil.pth")
    torch.save({"model": {"backbone.rgb_conv_init.0.weight": torch.zeros(32, 4, 5, 5)}}, tmp_path / "e.pth")
    with pytest.raises(CheckpointError, match="missing"):
        load_penet_checkpoint(fresh, tmp_path / "e.pth")
    with pytest.raises(CheckpointError, match="not found"):
        load_penet_checkpoint(fresh, tmp_path / "none.pth")

    # online completer: odd sizes are padded to /32 and cropped back
    comp = PENetCompleter(fresh)
    cal = Calibration(np.array([[60.0, 0, 35, 0], [0, 60, 25, 0], [0, 0, 1, 0]]), np.eye(3), np.eye(4)[:3])
    sparse = torch.zeros(50, 70)
    sparse[::7, ::5] = 10.0
    dense = comp(sparse, torch.randint(0, 255, (50, 70, 3), dtype=torch.uint8), cal)
    assert dense.shape == (50, 70) and torch.isfinite(dense).all() and (dense >= 0).all()


def test_generator_with_penet_model(frames, penet):
    """method: penet end to end through the generator (random weights, so only shapes/validity are checked),
    on a 128x256 top-left crop of a real frame (calibration without a recorded image size)."""
    name, vp, ip, cal = frames[8]
    pts, img = _load(vp, ip)
    img = img[100:228, 400:656].contiguous()  # crop shifts the principal point: adjust P2
    P2 = cal.P2.copy()
    P2[0, 2] -= 400
    P2[1, 2] -= 100
    P2[0, 3] -= 400 * P2[2, 3]
    P2[1, 3] -= 100 * P2[2, 3]
    cal2 = Calibration(P2, cal.R0_rect, cal.Tr_velo_to_cam)
    gen = PseudoPointGenerator(DepthConfig(method="penet"), penet_model=penet)
    res = gen(pts, img, cal2)
    assert res.raw_rows.shape[0] > 500 and res.pseudo_rows.shape[1] == 8
    assert torch.isfinite(res.pseudo_rows).all() and (res.pseudo_rows[:, 7] == 1).all()
    uv, d = cal2.lidar_to_img(res.raw_rows[:, :3].numpy().astype(np.float64))
    assert (uv >= 0).all() and (uv[:, 0] < 256).all() and (uv[:, 1] < 128).all()


def test_ipbasic_matches_opencv_pipeline(frames):
    """Parity with the OpenCV formulation of IP-Basic ``fill_in_fast`` (cv2.dilate / morphologyEx / medianBlur /
    bilateralFilter / GaussianBlur, as the paper's public code uses them). Skipped without cv2 (not a dependency);
    measured with opencv-python-headless 5.0: max |diff| <= 4.6e-5 m for all four variants on real frames."""
    cv2 = pytest.importorskip("cv2")
    d5 = ((np.abs(np.arange(5)[:, None] - 2) + np.abs(np.arange(5) - 2)) <= 2).astype(np.uint8)

    def cv_fast(d, extrapolate, blur, md=100.0):
        d = d.copy()
        v = d > 0.1
        d[v] = md - d[v]
        d = cv2.dilate(d, d5)
        d = cv2.morphologyEx(d, cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8))
        e = d < 0.1
        d[e] = cv2.dilate(d, np.ones((7, 7), np.uint8))[e]
        if extrapolate:
            top = np.argmax(d > 0.1, axis=0)
            tv = d[top, np.arange(d.shape[1])]
            rows = np.arange(d.shape[0])[:, None]
            d = np.where(rows < top[None], tv[None], d).astype(np.float32)
            e = d < 0.1
            d[e] = cv2.dilate(d, np.ones((31, 31), np.uint8))[e]
        d = cv2.medianBlur(d, 5)
        if blur == "bilateral":
            d = cv2.bilateralFilter(d, 5, 1.5, 2.0)
        elif blur == "gaussian":
            v = d > 0.1
            d[v] = cv2.GaussianBlur(d, (5, 5), 0)[v]
        v = d > 0.1
        d[v] = md - d[v]
        return np.where(v, d, 0)

    for name, vp, ip, cal in (frames[0], frames[8], frames[12]):
        pts, img = _load(vp, ip)
        H, W = img.shape[:2]
        V2R, P2 = calib_matrices(cal, "cpu")
        uv, d = project_points(pts[:, :3], V2R, P2)
        sp = sparse_depth_map(uv, d, fov_flag(uv, d, H, W), H, W)
        for ex, bl in ((False, "bilateral"), (False, "gaussian"), (True, "gaussian"), (False, "none")):
            ref = cv_fast(sp.numpy().astype(np.float32), ex, bl)
            ours = ipbasic_complete(sp, IPBasicConfig(extrapolate=ex, blur=bl)).numpy()
            assert np.abs(ours - ref).max() < 2e-4, (name, ex, bl)


def test_masked_thinning_path_equals_compacted(frames, gen):
    """The GPU path thins the full fixed-size pixel grid with a mask (no sync); the CPU path compacts first. Both
    must give identical pseudo rows."""
    from cmfiou_core.depth.pseudo import lift_depth

    name, vp, ip, cal = frames[8]
    pts, img = _load(vp, ip)
    res = gen(pts, img, cal, keep_maps=True)
    rows, valid = lift_depth(res.dense_depth, img, cal, 0.01)
    valid &= rows[:, 2] < 1.0
    order, n = la_sampling2_order(rows[:, :3], valid)
    assert torch.equal(rows[order[: int(n)]], res.pseudo_rows)


# ------------------------------------------------------------------------------------------------------ fast paths
# The optimised depth stage must give the same output as the implementation before its speed work, frozen in
# cmfiou_core.depth.reference. The CUDA code paths (single-pool dilation, sort-based median, vectorised bilateral,
# thinning on the full masked pixel grid) are forced on the CPU with ipbasic.FORCE_GPU_PATHS / cpu_compaction.
@pytest.fixture
def gpu_paths(monkeypatch):
    from cmfiou_core.depth import ipbasic

    monkeypatch.setattr(ipbasic, "FORCE_GPU_PATHS", True)
    g = PseudoPointGenerator(DepthConfig())
    g.cpu_compaction = False
    return g


def _random_cloud(g: np.random.Generator, n: int) -> np.ndarray:
    """Points below/around the sensor with many exact ties (quantised z, repeated points, +-0.0) and edge cases."""
    xyz = np.c_[g.uniform(-30, 30, n), g.uniform(-30, 30, n), np.round(g.uniform(-3.0, 0.5, n), 1)]
    xyz[::7] = xyz[1::7][: len(xyz[::7])]  # exact duplicates
    xyz[::11, 2] = 0.0
    xyz[::13, 2] = -0.0
    xyz[::17, 0] = 0.0   # phi = +-pi/2
    xyz[::19, 0] = -0.0
    xyz[5::23, :2] = 0.0  # theta = 0 or pi
    xyz[3] = (np.nan, 1, 1)
    xyz[4] = (np.inf, 1, -1)
    xyz[6] = (0, 0, 0)
    return xyz.astype(np.float32)


def test_thinning_dense_equals_sorted_random():
    """Sort-free thinning == the sort-based reference (same points, same order) on random clouds with ties, +-0.0 z,
    NaN / inf / zero points and several configs; when a voxel overflows the cap, the flag is raised and
    la_sampling2_order falls back to the sort path."""
    from cmfiou_core.depth.pseudo import la_sampling2_dense, thinning_grid
    from cmfiou_core.depth.reference import la_sampling2_order_sorted

    g = np.random.default_rng(0)
    cfgs = [ThinningConfig(), ThinningConfig(voxel_size=(200.0, 0.05, 0.05)), ThinningConfig(theta_min=0.0),
            ThinningConfig(voxel_size=(5.0, 0.01, 0.02), voxel_range=(0.0, 0.5, -1.0, 20.0, 3.0, 1.0)),
            ThinningConfig(voxel_size=(200.0, 0.05, 0.05), max_points_per_voxel=3)]
    seen_overflow = seen_ok = 0
    for trial in range(6):
        n = int(g.integers(1, 6000))
        xyz = torch.from_numpy(_random_cloud(g, n)) if n > 30 else torch.randn(n, 3)
        valid = torch.from_numpy(g.random(n) < 0.9)
        for cfg in cfgs:
            grid = thinning_grid(cfg)
            assert grid is not None
            ro, rn = la_sampling2_order_sorted(xyz, valid, cfg)
            ref = ro[: int(rn)]
            order, cnt, overflow = la_sampling2_dense(xyz, valid, cfg, grid)
            if bool(overflow):
                seen_overflow += 1
            else:
                seen_ok += 1
                assert torch.equal(order[: int(cnt)], ref), (trial, cfg)
            o2, n2 = la_sampling2_order(xyz, valid, cfg)  # exact in both cases
            assert torch.equal(o2[: int(n2)], ref)
            o3, n3, _ = la_sampling2_dense(xyz[valid], None, cfg, grid)  # valid=None: all valid
            if not bool(overflow):
                assert torch.equal(torch.nonzero(valid).squeeze(1)[o3[: int(n3)]], ref)
    assert seen_overflow and seen_ok
    # empty input
    o, c, f = la_sampling2_dense(torch.zeros(0, 3), None, ThinningConfig(), thinning_grid(ThinningConfig()))
    assert o.shape == (0,) and int(c) == 0 and not bool(f)


def test_thinning_grid_is_conservative():
    """Every point that passes the reference filters (theta > theta_min, 0 <= voxel index < grid) lies inside the
    restricted dense grid, including the extreme angles theta = float32(pi), phi = +-pi/2, r -> 0 and points just
    above theta_min; a too-large grid falls back to the sort path."""
    from cmfiou_core.depth.pseudo import thinning_grid

    g = np.random.default_rng(1)
    n = 20000
    d = g.normal(size=(n, 3))
    d[: n // 4, :2] *= 1e-6  # near the poles
    d[n // 4: n // 2, 0] = 0.0  # phi = +-pi/2
    d[n // 2: n // 2 + 100, 0] = -0.0
    ext = np.array([[0, 0, -1], [0, 1, -1e-3], [0, -1, -1e-3], [1e-30, 0, -1], [1, 0, math.cos(1.5 + 1e-7)]])
    d = np.r_[d, ext] * g.uniform(1e-3, 99.0, size=(n + len(ext), 1))
    xyz = torch.from_numpy(d.astype(np.float32))
    for cfg in (ThinningConfig(), ThinningConfig(theta_min=0.0), ThinningConfig(theta_min=-1.0),
                ThinningConfig(voxel_size=(200.0, 0.01, 0.01), voxel_range=(-100.0, -3.2, -1.6, 100.0, 3.2, 1.6))):
        lo, shape = thinning_grid(cfg)
        r = torch.linalg.vector_norm(xyz, dim=1)
        comps = (r, torch.arccos(xyz[:, 2] / r), torch.atan(xyz[:, 1] / xyz[:, 0]))
        grid = [int(round((cfg.voxel_range[i + 3] - cfg.voxel_range[i]) / cfg.voxel_size[i])) for i in range(3)]
        ok = comps[1] > cfg.theta_min
        cs = []
        for i, comp in enumerate(comps):
            ci = torch.floor((comp - cfg.voxel_range[i]) / cfg.voxel_size[i])
            ok &= (ci >= 0) & (ci < grid[i])
            cs.append(ci)
        assert ok.sum() > 100
        for i, ci in enumerate(cs):
            assert (ci[ok] >= lo[i]).all() and (ci[ok] < lo[i] + shape[i]).all(), (cfg, i)
    assert thinning_grid(ThinningConfig(voxel_size=(200.0, 0.0005, 0.0005))) is None


def test_compact_order_without_sort():
    from cmfiou_core.depth.pseudo import _compact_order

    g = torch.Generator().manual_seed(0)
    for n in (0, 1, 2, 17, 5000):
        for p in (0.0, 0.3, 1.0):
            m = torch.rand(n, generator=g) < p
            o, c = _compact_order(m)
            assert o.shape == (n,) and int(c) == int(m.sum())
            assert torch.equal(o[: int(c)], torch.nonzero(m).squeeze(1))


def test_ipbasic_fast_paths_equal_reference_random():
    """Morphology (single / separable pools, diamond as a union of rectangles), median (median and sort paths) and
    bilateral (per-tap and vectorised) are bit-identical to the frozen code on random sparse maps of odd sizes,
    for every kernel and option."""
    from cmfiou_core.depth import ipbasic, reference

    g = torch.Generator().manual_seed(0)
    for H, W in ((5, 5), (7, 9), (40, 57), (64, 301)):
        x = torch.rand(1, 1, H, W, generator=g) * 120 * (torch.rand(1, 1, H, W, generator=g) < 0.15)
        x[..., 0, 0] = 100.0  # exactly max_depth -> inverted 0
        for gpu in (False, True):
            ipbasic.FORCE_GPU_PATHS = gpu
            try:
                for k in ("full3", "full5", "full7", "full31", "cross3", "cross5", "cross7", "diamond5", "diamond7"):
                    assert torch.equal(ipbasic.dilate(x, k), reference.dilate(x, k)), (H, W, k, gpu)
                assert torch.equal(ipbasic.median5(x), reference.median5(x))
                assert torch.equal(ipbasic.bilateral5(x), reference.bilateral5(x)), (H, W, gpu)
                for kernel in ("diamond5", "full3", "cross7", "diamond7"):
                    for ex in (False, True):
                        for blur in ("bilateral", "gaussian", "none"):
                            cfg = IPBasicConfig(dilation_kernel=kernel, extrapolate=ex, blur=blur)
                            assert torch.equal(ipbasic_complete(x[0, 0], cfg),
                                               reference.ipbasic_complete(x[0, 0], cfg)), (H, W, cfg, gpu)
            finally:
                ipbasic.FORCE_GPU_PATHS = None
    assert torch.equal(ipbasic.median5(x, sort=True), ipbasic.median5(x, sort=False))
    assert torch.equal(ipbasic.bilateral5(x, vectorised=True), ipbasic.bilateral5(x, vectorised=False))


def test_depth_stage_equals_reference_on_real_frames(frames, gen, gpu_paths):
    """On every real frame the optimised stage equals the frozen implementation bit for bit: FOV flags, sparse depth,
    IP-Basic completion, and the generator's raw and pseudo rows (CPU paths on all frames; the CUDA paths -- thinning
    on the full masked pixel grid, pool / median / bilateral variants -- on three of them)."""
    from cmfiou_core.depth import reference

    for i, (name, vp, ip, cal) in enumerate(frames):
        pts, img = _load(vp, ip)
        H, W = img.shape[:2]
        V2R, P2 = calib_matrices(cal, "cpu")
        uv, d = project_points(pts[:, :3], V2R, P2)
        fov = fov_flag(uv, d, H, W)
        assert torch.equal(fov, reference.fov_flag(uv, d, H, W)), name
        sp = sparse_depth_map(uv, d, fov, H, W)
        assert torch.equal(sp, reference.sparse_depth_map(uv, d, fov, H, W)), name
        raw_ref, ps_ref = reference.reference_pseudo_points(pts, img, cal)
        gens = (gen, gpu_paths) if i in (0, 8, 14) else (gen,)
        for gg in gens:
            res = gg(pts, img, cal, keep_maps=True)
            assert torch.equal(res.dense_depth, reference.ipbasic_complete(sp)), name
            assert torch.equal(res.raw_rows, raw_ref), name
            assert torch.equal(res.pseudo_rows, ps_ref), (name, res.pseudo_rows.shape, ps_ref.shape)
    # options: no thinning, all raw rows, official crop
    name, vp, ip, cal = frames[8]
    pts, img = _load(vp, ip)
    for cfg in (DepthConfig(thinning=ThinningConfig(enabled=False), fov_filter_raw=False),
                DepthConfig(crop_official=True)):
        raw_ref, ps_ref = reference.reference_pseudo_points(pts, img, cal, cfg)
        res = PseudoPointGenerator(cfg)(pts, img, cal)
        assert torch.equal(res.raw_rows, raw_ref) and torch.equal(res.pseudo_rows, ps_ref), cfg
