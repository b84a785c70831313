"""Synthetic KITTI-layout scene generator: determinism, label/sensor consistency, image/LiDAR agreement."""
import hashlib
import math
import time

import numpy as np
import pytest
import torch

from cmfiou_core.data import synthetic as syn
from cmfiou_core.data.synth.scene import MATERIALS
from cmfiou_core.data.labels import parse_label_line, read_label_file
from cmfiou_core.geometry.boxes import boxes3d_kitti_camera_to_imageboxes, boxes3d_kitti_camera_to_lidar, \
    boxes_to_corners_3d
from cmfiou_core.geometry.points_in_boxes import points_in_boxes_mask


@pytest.fixture(scope="module")
def frames():
    return [syn.generate_frame(7, i) for i in range(4)]


def _label_objects(fr):
    return [parse_label_line(l) for l in fr.label_text.splitlines() if l.strip()]


def _cam_boxes(objs):
    return np.array([o["location"] + [o["dimensions_hwl"][2], o["dimensions_hwl"][0], o["dimensions_hwl"][1],
                                      o["rotation_y"]] for o in objs], dtype=np.float64).reshape(-1, 7)


def test_lidar_geometry(frames):
    el = np.rad2deg(syn.hdl64_elevations())
    assert el.shape == (64,) and abs(el[0] - 2.0) < 1e-9 and abs(el[-1] + 24.9) < 1e-9
    assert np.all(np.diff(el) < 0)
    up, low = np.diff(el[:32]), np.diff(el[32:])
    assert abs(up.mean()) < abs(low.mean())  # denser upper block, as the HDL-64E
    for fr in frames:
        p = fr.points
        assert p.dtype == np.float32 and p.shape[1] == 4
        assert 90_000 < p.shape[0] < 64 * 2083
        r = np.linalg.norm(p[:, :3], axis=1)
        assert r.max() <= 120.5 and p[:, 3].min() >= 0 and p[:, 3].max() <= 1
        ground = fr.point_object < 0
        near = ground & (r < 20) & (p[:, 2] < -1.5)
        assert abs(float(np.median(p[near, 2])) + 1.73) < 0.02  # mount height


def test_determinism(tmp_path):
    a, b = syn.generate_frame(3, 5), syn.generate_frame(3, 5)
    assert np.array_equal(a.points, b.points) and np.array_equal(a.image, b.image) and a.label_text == b.label_text
    c = syn.generate_frame(4, 5)
    assert not np.array_equal(a.points[:1000], c.points[:1000])
    syn.generate_dataset(tmp_path / "a", 3, seed=11, workers=1)
    syn.generate_dataset(tmp_path / "b", 3, seed=11, workers=2)

    def digest(root):
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    da, db = digest(tmp_path / "a"), digest(tmp_path / "b")
    assert da == db and len(da) == 3 * 5 + 3
    assert (tmp_path / "a" / "training" / "velodyne" / "000002.bin").stat().st_size % 16 == 0


def test_labels_match_geometry(frames):
    for fr in frames:
        objs = _label_objects(fr)
        real = [o for o in objs if o["name"] != "DontCare"]
        assert len(real) == int(fr.labelled.sum()) > 0
        cam = _cam_boxes(real)
        lid = boxes3d_kitti_camera_to_lidar(cam, fr.calib)
        np.testing.assert_allclose(lid, fr.boxes_lidar[fr.labelled], atol=1e-6)
        # 2D boxes = projected corners clipped (exact up to the 2-decimal text rounding)
        box2d = boxes3d_kitti_camera_to_imageboxes(cam, fr.calib, (syn.IMAGE_H, syn.IMAGE_W))
        np.testing.assert_allclose(np.array([o["bbox"] for o in real]), box2d, atol=0.0051)
        unclipped = boxes3d_kitti_camera_to_imageboxes(cam, fr.calib)
        inside = (unclipped[:, 0] >= 0) & (unclipped[:, 2] <= syn.IMAGE_W - 1) & (unclipped[:, 1] >= 0) & \
                 (unclipped[:, 3] <= syn.IMAGE_H - 1)
        np.testing.assert_allclose(np.array([o["bbox"] for o in real])[inside], unclipped[inside], atol=0.0051)
        trunc = np.array([o["truncated"] for o in real])
        assert np.all(trunc[inside] == 0.0)
        for o in real:
            assert o["occluded"] in (0, 1, 2)
            assert abs(o["alpha"]) <= math.pi + 1e-6
            x, _, z = o["location"]
            want = (o["rotation_y"] - math.atan2(x, z) + math.pi) % (2 * math.pi) - math.pi
            assert abs((o["alpha"] - want + math.pi) % (2 * math.pi) - math.pi) < 0.006
        names = [o["name"] for o in objs]
        assert names == sorted(names, key=lambda n: n == "DontCare")  # DontCare last


def test_visible_objects_have_points(frames):
    checked = 0
    for fr in frames:
        objs = [o for o in _label_objects(fr) if o["name"] != "DontCare"]
        lid = boxes3d_kitti_camera_to_lidar(_cam_boxes(objs), fr.calib)
        cnt = points_in_boxes_mask(torch.from_numpy(fr.points[:, :3].astype(np.float64)),
                                   torch.from_numpy(lid)).sum(0).numpy()
        for o, n, b in zip(objs, cnt, lid):
            dist = math.hypot(b[0], b[1])
            if o["occluded"] == 0 and o["truncated"] < 0.3 and dist < 40:
                checked += 1
                assert n >= 15, (o, n, dist)
            if o["occluded"] <= 1 and dist < 60:
                assert n >= 1, (o, n, dist)
    assert checked >= 4


def test_image_lidar_agreement(frames):
    checked = 0
    for fr in frames:
        uv, depth = fr.calib.lidar_to_img(fr.points[:, :3].astype(np.float64))
        u, v = np.round(uv[:, 0]).astype(int), np.round(uv[:, 1]).astype(int)
        ok = (depth > 0) & (u >= 0) & (u < syn.IMAGE_W) & (v >= 0) & (v < syn.IMAGE_H)
        for k, name in enumerate(fr.names):
            if name != "Car" or not fr.labelled[k] or fr.occluded[k] != 0:
                continue
            if math.hypot(*fr.boxes_lidar[k, :2]) > 25:
                continue
            sel = ok & (fr.point_object == k)
            if sel.sum() < 30:
                continue
            checked += 1
            # the LiDAR points of car k project onto pixels that show car k ...
            hit = fr.pixel_object[v[sel], u[sel]] == k
            assert hit.mean() > 0.85, hit.mean()
            # ... and those pixels have the car's colour (body or window albedo under Lambertian shading)
            pix = fr.image[v[sel], u[sel]].astype(np.float64)[hit]
            res = []
            for alb in (np.array(fr.colours[k]), np.array(MATERIALS["window"][0])):
                a = 255.0 * alb
                s = np.clip(pix @ a / (a @ a), 0.4, 1.05)
                res.append(np.linalg.norm(pix - s[:, None] * a[None], axis=1))
            assert np.mean(np.minimum(*res) < 30) > 0.9
    assert checked >= 2


def test_write_layout_and_plane(tmp_path):
    root = syn.generate_dataset(tmp_path / "d", 2, seed=5, workers=1, val_fraction=0.5)
    tr = root / "training"
    for sub, ext in (("calib", "txt"), ("label_2", "txt"), ("image_2", "png"), ("velodyne", "bin"),
                     ("planes", "txt")):
        assert (tr / sub / f"000001.{ext}").is_file()
    assert sorted((root / "ImageSets" / "train.txt").read_text().split() +
                  (root / "ImageSets" / "val.txt").read_text().split()) == ["000000", "000001"]
    read_label_file(tr / "label_2" / "000000.txt")
    from cmfiou_core.calib import Calibration
    from cmfiou_core.data.kitti import read_road_plane

    cal = Calibration.from_kitti_object_file(tr / "calib" / "000000.txt")
    plane = read_road_plane(tr / "planes" / "000000.txt")
    # ground point below the LiDAR lies on the plane
    g = cal.lidar_to_rect(np.array([[10.0, 2.0, -1.73]]))[0]
    assert abs(plane[:3] @ g + plane[3]) < 1e-5
    syn.generate_dataset(tmp_path / "t", 1, seed=5, workers=1, split="testing")
    assert (tmp_path / "t" / "ImageSets" / "test.txt").read_text().split() == ["000000"]
    assert not (tmp_path / "t" / "testing" / "label_2").exists()


def test_ensure_demo_scenes(tmp_path):
    root = syn.ensure_demo_scenes(2, root=tmp_path / "demo")
    assert (root / "training" / "velodyne" / "000001.bin").is_file()
    t = time.perf_counter()
    assert syn.ensure_demo_scenes(2, root=tmp_path / "demo") == root
    assert time.perf_counter() - t < 0.1


def _ref_corners_lidar(box):
    """Brute-force (8, 3) corners of one LiDAR box: rotate (+-dx/2, +-dy/2, +-dz/2) by the heading, add the centre."""
    x, y, z, dx, dy, dz, h = (float(v) for v in box[:7])
    c, s = math.cos(h), math.sin(h)
    out = []
    for sx, sy, sz in ((1, 1, -1), (1, -1, -1), (-1, -1, -1), (-1, 1, -1), (1, 1, 1), (1, -1, 1), (-1, -1, 1),
                       (-1, 1, 1)):
        lx, ly, lz = sx * dx / 2, sy * dy / 2, sz * dz / 2
        out.append((x + lx * c - ly * s, y + lx * s + ly * c, z + lz))
    return np.array(out)


def test_box_geometry_on_frames_float64(frames):
    """The generator calls cmfiou_core.geometry.boxes with float64 numpy boxes (it used to keep numpy twins): the
    results come back as float64 numpy and agree with brute-force references to float64 precision."""
    from cmfiou_core.geometry.boxes import boxes3d_lidar_to_kitti_camera

    fr = frames[0]
    calib = fr.calib
    b = fr.boxes_lidar
    assert b.dtype == np.float64 and b.shape[0] > 0
    corners = boxes_to_corners_3d(b)
    assert isinstance(corners, np.ndarray) and corners.dtype == np.float64
    np.testing.assert_allclose(corners, np.stack([_ref_corners_lidar(x) for x in b]), rtol=0, atol=1e-12)

    cam = boxes3d_lidar_to_kitti_camera(b, calib)
    assert isinstance(cam, np.ndarray) and cam.dtype == np.float64
    V2R = calib.V2R
    for bl, bc in zip(b, cam):
        bottom = V2R @ np.array([bl[0], bl[1], bl[2] - bl[5] / 2, 1.0])
        np.testing.assert_allclose(bc[:3], bottom[:3], rtol=0, atol=1e-12)
        np.testing.assert_array_equal(bc[3:6], [bl[3], bl[5], bl[4]])  # (l, h, w) = (dx, dz, dy)
        assert abs(bc[6] - (-bl[6] - math.pi / 2)) < 1e-15
    back = boxes3d_kitti_camera_to_lidar(cam, calib)
    assert back.dtype == np.float64
    np.testing.assert_allclose(back, b, rtol=0, atol=1e-12)

    # 2D boxes: min/max of the 8 corners of the camera box (upright in the rect frame, bottom centre, rotated by ry
    # about the camera y axis) projected with P2, clipped
    for shape in (None, (syn.IMAGE_H, syn.IMAGE_W)):
        box2d = boxes3d_kitti_camera_to_imageboxes(cam, calib, shape)
        assert isinstance(box2d, np.ndarray) and box2d.dtype == np.float64
        for k, (x, y, z, l, h, w, ry) in enumerate(cam):
            c, s = math.cos(ry), math.sin(ry)
            rect = np.array([(x + sx * l / 2 * c + sz * w / 2 * s, y - top * h, z - sx * l / 2 * s + sz * w / 2 * c)
                             for top in (0, 1) for sx, sz in ((1, 1), (1, -1), (-1, -1), (-1, 1))])
            if np.any(rect[:, 2] <= 0.1):
                continue  # behind the camera: projection not meaningful
            hom = np.c_[rect, np.ones(8)] @ calib.P2.T
            uv = hom[:, :2] / hom[:, 2:3]
            want = np.r_[uv.min(0), uv.max(0)]
            if shape is not None:
                want = np.clip(want, 0, [shape[1] - 1, shape[0] - 1, shape[1] - 1, shape[0] - 1])
            np.testing.assert_allclose(box2d[k], want, rtol=0, atol=1e-8)
    # the frame's 2D boxes of labelled objects are those of the geometry module on the (2-decimal) label boxes
    real = [o for o in _label_objects(fr) if o["name"] != "DontCare"]
    np.testing.assert_allclose(fr.bbox2d[fr.labelled],
                               boxes3d_kitti_camera_to_imageboxes(_cam_boxes(real), calib, (375, 1242)),
                               rtol=0, atol=1e-9)


def test_generation_speed():
    t = time.process_time()
    syn.generate_frame(99, 0)
    assert time.process_time() - t < 5.0  # ~0.5 s CPU on one core when idle


def test_synthetic_end_to_end_dataset(tmp_path):
    """Fresh-clone path (no ../shared): generate -> infos -> GT DB -> training/test items with pseudo points."""
    from cmfiou_core.data.collate import collate_batch
    from cmfiou_core.data.gt_database import create_gt_database
    from cmfiou_core.data.kitti import KittiDataset, create_infos

    root = syn.generate_dataset(tmp_path / "s", 4, seed=21, workers=1, val_fraction=0.25)
    infos = create_infos(root, "train", out="default")
    create_infos(root, "val", out="default")
    for info in infos:  # every labelled synthetic object in the FOV holds points
        a = info["annos"]
        n = a["gt_boxes_lidar"].shape[0]
        near = np.hypot(a["gt_boxes_lidar"][:, 0], a["gt_boxes_lidar"][:, 1]) < 40
        vis = (a["occluded"][:n] == 0) & (a["truncated"][:n] < 0.3) & near
        assert np.all(a["num_points_in_gt"][:n][vis] >= 15)
    create_gt_database(root, infos)
    ds = KittiDataset(root, "train", training=True, seed=0)
    items = [ds[i] for i in range(len(ds))]
    for it in items:
        assert it["points"].shape[0] > 5000 and it["points_mm"].shape[0] > 1000
        assert it["gt_boxes"].shape[0] > 0
    # the road plane file is used: pasted boxes stand on the ground (no plane -> they would keep their DB height)
    assert (root / "training" / "planes" / "000000.txt").is_file()
    test_item = KittiDataset(root, "val", training=False)[0]
    b = collate_batch(items + [test_item])
    assert b["batch_size"] == len(items) + 1
