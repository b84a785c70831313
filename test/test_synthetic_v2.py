"""The kitti_v2 generator profile: HDL-64E scan structure against the sensor's analytic geometry, glass, label boxes
holding their objects' returns, non-target KITTI classes through the training data path, reproducibility."""
import hashlib
import math

import numpy as np
import pytest
import torch

from cmfiou_core.data.labels import KITTI_TYPES, parse_label_line
from cmfiou_core.data.synth.scene import SceneConfig, profile_config
from cmfiou_core.data.synth.scene_v2 import KITTI_MEAN_LWH, MAT_GLASS, MAT_PAINT, MAT_RETRO
from cmfiou_core.data.synthetic import generate_dataset, generate_frame
from cmfiou_core.geometry.boxes import boxes3d_kitti_camera_to_lidar
from cmfiou_core.geometry.points_in_boxes import points_in_boxes_mask

V2 = profile_config("kitti_v2")
W = 2083
# HDL-64E S2 datasheet: vertical FOV +2 .. -24.8 deg; upper block 32 lasers to -8.33 deg, lower block 32 lasers from
# -8.83 deg (written here independently of the generator)
NOMINAL = np.r_[np.linspace(2.0, -8.33, 32), np.linspace(-8.83, -24.9, 32)]
MOUNT = 1.73


@pytest.fixture(scope="module")
def frames():
    return [generate_frame(3, i, V2) for i in range(3)]


def _labels(fr):
    return [parse_label_line(l) for l in fr.label_text.splitlines() if l.strip()]


def _lidar_boxes(objs, calib):
    cam = np.array([o["location"] + [o["dimensions_hwl"][2], o["dimensions_hwl"][0], o["dimensions_hwl"][1],
                                     o["rotation_y"]] for o in objs], dtype=np.float64).reshape(-1, 7)
    return boxes3d_kitti_camera_to_lidar(cam, calib)


def test_default_profile_is_v1():
    assert SceneConfig().profile == "v1" and profile_config("v1") == SceneConfig()
    with pytest.raises(ValueError, match="unknown generator profile 'nope'"):
        generate_frame(0, 0, SceneConfig(profile="nope"))


def test_hdl64_ring_structure(frames):
    for fr in frames:
        p = fr.points.astype(np.float64)
        assert p.dtype == np.float64 and 60_000 < p.shape[0] <= 64 * W
        rxy = np.hypot(p[:, 0], p[:, 1])
        el = np.rad2deg(np.arctan2(p[:, 2], rxy))
        ring = np.argmin(np.abs(el[:, None] - NOMINAL[None, :]), 1)
        # every return lies on one of the 64 lasers (per-unit calibration jitter 0.03 deg 1 sigma)
        assert np.abs(el - NOMINAL[ring]).max() < 0.16
        # ... and on the 2083-step azimuth grid
        az = np.arctan2(p[:, 1], p[:, 0])
        j = np.round((az + math.pi) / (2 * math.pi / W) - 0.5)
        assert np.abs(az - (-math.pi + (j + 0.5) * 2 * math.pi / W)).max() < 1e-4
        counts = np.bincount(ring, minlength=64)
        assert counts.max() <= W
        # the lowest laser hits the road all around at r = h / tan(24.9 deg) = 3.72 m and nearly always returns
        low = ring == 63
        assert counts[63] > 0.85 * W
        assert abs(float(np.median(rxy[low])) - MOUNT / math.tan(math.radians(24.9))) < 0.1
        assert abs(float(np.median(p[low, 2])) + MOUNT) < 0.03
        # a flat or climbing road: every beam below -1 deg meets something within 1.73 / sin(1 deg) = 99 m < 120 m
        if fr.extras["layout"].hill_c >= 0:
            down = np.rad2deg(fr.extras["elevations"]) < -1.0
            assert not np.any(fr.extras["ray_material"][down] == -2)
        # range limit and KITTI's intensity range
        assert np.linalg.norm(p[:, :3], axis=1).max() <= 120.5
        assert p[:, 3].min() >= 0 and p[:, 3].max() < 1


def test_glass_returns_nothing(frames):
    n_glass = 0
    for fr in frames:
        rays = fr.extras["ray_material"]
        n_glass += int((rays == MAT_GLASS).sum())
        assert not np.any(fr.extras["point_material"] == MAT_GLASS)
        # the rays that met glass are exactly missing from the cloud: points = valid rays of other materials
        assert fr.points.shape[0] <= int((rays != MAT_GLASS).sum() - (rays == -2).sum())
    assert n_glass > 1000  # car windows and shop windows are there


def test_ray_drop_and_intensity_by_material_and_range(frames):
    """Return rate: glass never, retro-reflectors always, road falls with range (weaker echo, grazing incidence);
    intensity: licence plates bright, dark paint dim, everything in [0, 1)."""
    mats = np.concatenate([fr.extras["ray_material"].ravel() for fr in frames])
    rng_ = np.concatenate([fr.extras["ray_range"].ravel() for fr in frames])
    ret = np.concatenate([fr.extras["ray_returned"].ravel() for fr in frames])
    assert not ret[mats == MAT_GLASS].any() and ret[mats == MAT_RETRO].all() and (mats == MAT_RETRO).sum() > 20
    road = mats == -1
    near, far = road & (rng_ > 5) & (rng_ < 15), road & (rng_ > 40) & (rng_ < 70)
    assert near.sum() > 1000 and far.sum() > 100
    assert ret[near].mean() > 0.9 and ret[far].mean() < ret[near].mean() - 0.1, (ret[near].mean(), ret[far].mean())
    for fr in frames:
        pm, it = fr.extras["point_material"], fr.points[:, 3]
        assert np.all(it[pm == MAT_RETRO] >= 0.9)
        cars = np.isin(fr.point_object, [k for k, n in enumerate(fr.names) if n == "Car"])
        paint = (pm == MAT_PAINT) & cars
        assert paint.sum() > 500 and np.median(it[paint]) < 0.3  # car paint returns weakly (specular)


def test_label_boxes_hold_their_objects_returns(frames):
    checked = 0
    for fr in frames:
        objs = [o for o in _labels(fr) if o["name"] != "DontCare"]
        lid = _lidar_boxes(objs, fr.calib)
        idx = np.nonzero(fr.labelled)[0]
        np.testing.assert_allclose(lid, fr.boxes_lidar[idx], atol=1e-6)
        grown = lid.copy()
        grown[:, 3:6] += 0.2  # range noise (sigma <= 2.5 cm, 4 sigma = 10 cm) may push a return out
        pts = torch.from_numpy(fr.points[:, :3].astype(np.float64))
        inside = points_in_boxes_mask(pts, torch.from_numpy(grown)).numpy()
        for j, k in enumerate(idx):
            own = fr.point_object == k
            if own.sum() == 0:
                continue
            checked += 1
            assert inside[own, j].mean() > 0.995, (objs[j]["name"], inside[own, j].mean())
        # an unoccluded, untruncated car within 25 m has a dense cloud
        for j, k in enumerate(idx):
            d = math.hypot(*lid[j, :2])
            if objs[j]["name"] == "Car" and objs[j]["occluded"] == 0 and objs[j]["truncated"] < 0.1 and d < 25:
                assert (fr.point_object == k).sum() > 80, d
    assert checked >= 15


def test_classes_and_sizes():
    names, sizes = [], {}
    for i in range(4):
        fr = generate_frame(11, i, V2)
        for o in _labels(fr):
            assert o["name"] in KITTI_TYPES
            names.append(o["name"])
            if o["name"] != "DontCare":
                h, w, l = o["dimensions_hwl"]
                sizes.setdefault(o["name"], []).append((l, w, h))
    assert {"Car", "Pedestrian", "Cyclist"} <= set(names)
    assert set(names) & {"Van", "Truck", "Tram", "Misc", "Person_sitting"}  # non-target classes are labelled
    cars = np.array(sizes["Car"])
    assert cars.shape[0] >= 20
    # sizes scatter around the published KITTI means (Frustum PointNets' table), not one template
    assert np.all(np.abs(cars.mean(0) - np.array(KITTI_MEAN_LWH["Car"])) < (0.25, 0.08, 0.08)), cars.mean(0)
    assert cars[:, 0].std() > 0.2 and len(np.unique(cars[:, 0])) > 0.6 * len(cars)


def test_pedestrian_returns_span_the_box(frames):
    """A near pedestrian's returns (legs, torso, arms, head) span most of its label box height and stay inside it."""
    seen = 0
    for fr in frames:
        for k, n in enumerate(fr.names):
            if n != "Pedestrian" or not fr.labelled[k] or fr.visible_fraction[k] < 0.95:
                continue  # (a person behind a parked car shows only the upper body)
            sel = fr.point_object == k
            if sel.sum() < 60:
                continue
            p = fr.points[sel].astype(np.float64)
            zb = fr.boxes_lidar[k, 2] - fr.boxes_lidar[k, 5] / 2
            hz = fr.boxes_lidar[k, 5]
            assert p[:, 2].max() - p[:, 2].min() > 0.6 * hz
            seen += 1
            rel = (p[:, 2] - zb) / hz
            assert np.all((rel > -0.05) & (rel < 1.05))
    assert seen >= 1


def test_reproducible_and_worker_independent(tmp_path):
    generate_dataset(tmp_path / "a", 2, seed=9, workers=1, cfg=V2)
    generate_dataset(tmp_path / "b", 2, seed=9, workers=2, cfg=V2)

    def digest(root):
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    da = digest(tmp_path / "a")
    assert da == digest(tmp_path / "b")
    assert da["training/velodyne/000000.bin"] != da["training/velodyne/000001.bin"]
    fr = generate_frame(9, 1, V2)  # this process, the same frame: the same bytes
    assert (tmp_path / "a/training/velodyne/000001.bin").read_bytes() == fr.points.tobytes()
    assert (tmp_path / "a/training/label_2/000001.txt").read_text() == fr.label_text


def test_training_data_path_ignores_non_targets(tmp_path):
    """gen_scenes --profile kitti_v2 -> create_infos -> KittiDataset (training, no augmentation): Van becomes Car
    (data.use_van, as the official config), Truck / Tram / Misc / Person_sitting / DontCare are no targets; the
    targets keep their label boxes."""
    from cmfiou_core.data.kitti import DatasetConfig, KittiDataset, create_infos
    from cmfiou_core.tools.gen_scenes import main as gen_main

    root = tmp_path / "g"
    assert gen_main(["--out", str(root), "--num", "4", "--seed", "11", "--profile", "kitti_v2", "--workers", "1",
                     "--val-fraction", "0"]) == 0
    infos = create_infos(root, "train", out="default")
    seen = set()
    for info in infos:
        seen |= set(info["annos"]["name"].tolist())
    assert seen & {"Van", "Truck", "Tram", "Misc", "Person_sitting"}, seen
    cfg = DatasetConfig(use_pseudo=False, raw_points_from_bin=True, shuffle_points=False)
    ds = KittiDataset(root, "train", training=True, cfg=cfg, augment=False)
    names_out = set()
    for i, info in enumerate(infos):
        a = info["annos"]
        n = a["gt_boxes_lidar"].shape[0]
        src = np.where(a["name"][:n] == "Van", "Car", a["name"][:n])
        want = np.isin(src, ("Car", "Pedestrian", "Cyclist"))
        it = ds._prepare(ds.load_sample(i), np.random.default_rng(0))
        if it is None:  # a frame without any target in range is redrawn by __getitem__
            continue
        names_out |= set(it["gt_names"].tolist())
        # the kept boxes are the label boxes of the target classes (those inside the point-cloud range)
        kept = it["gt_boxes"][:, :7].astype(np.float64)
        ref = a["gt_boxes_lidar"][:n][want]
        assert kept.shape[0] <= ref.shape[0]
        for b in kept:
            assert np.min(np.abs(ref - b).max(1)) < 1e-4
        cls = it["gt_boxes"][:, 7].astype(int)
        assert set(cls.tolist()) <= {1, 2, 3}
    assert names_out and names_out <= {"Car", "Pedestrian", "Cyclist"}


def test_riderless_bicycles_and_people_beside_bikes():
    """Cyclists without a rider's pose: parked bicycles are labelled Misc with a bicycle's size (KITTI mean Cyclist
    box 1.76 x 0.60 x 1.74 m, a bike alone is lower) and their returns stay below the handlebar (no rider), while a
    near Cyclist's returns reach above it; people standing beside their bikes are Pedestrians; no Cyclist box sits on
    either."""
    bikes = pairs = riders = 0
    for seed, i in ((11, 0), (11, 1), (8, 1)):  # people with bikes (11) and a rack of three (8, 1)
        fr = generate_frame(seed, i, V2)
        objs = [o for o in _labels(fr) if o["name"] != "DontCare"]
        lid = _lidar_boxes(objs, fr.calib)
        names = np.array([o["name"] for o in objs])
        idx = np.nonzero(fr.labelled)[0]
        cyc, ped = lid[names == "Cyclist"], lid[names == "Pedestrian"]
        for j in range(len(objs)):
            own = fr.point_object == idx[j]
            zrel = fr.points[own, 2] - (lid[j, 2] - lid[j, 5] / 2)  # height of the returns above the box bottom
            if names[j] == "Cyclist" and own.sum() >= 60:
                riders += 1
                assert zrel.max() > 1.35, zrel.max()  # the rider's shoulders and head
            if names[j] != "Misc" or lid[j, 4] >= 0.8:
                continue
            bikes += 1
            l, w, h = lid[j, 3:6]
            assert 1.5 < l < 2.0 and 0.45 < w < 0.8 and 1.0 < h < 1.25, (l, w, h)
            if own.any():
                assert zrel.max() < 1.2, zrel.max()
            if len(cyc):
                assert np.hypot(*(cyc[:, :2] - lid[j, :2]).T).min() > 1.0
            pairs += int(len(ped) > 0 and np.hypot(*(ped[:, :2] - lid[j, :2]).T).min() < 1.2)
    assert bikes >= 6 and pairs >= 3 and riders >= 1, (bikes, pairs, riders)
