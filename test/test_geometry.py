"""Geometry ops vs independent references: shapely (rotated IoU), brute-force loops (NMS, points-in-boxes, voxel query)."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from shapely.geometry import Polygon

from cmfiou_core.calib import Calibration
from cmfiou_core.geometry.boxes import (boxes3d_kitti_camera_to_imageboxes, boxes3d_kitti_camera_to_lidar,
                                        boxes3d_lidar_to_kitti_camera, boxes_bev_corners, boxes_to_corners_3d,
                                        kitti_alpha, limit_period, lidar_boxes_to_kitti, pad_small_image_boxes,
                                        rotate_points_along_z)
from cmfiou_core.geometry.coders import ResidualCoder, add_sin_difference
from cmfiou_core.geometry.iou import (boxes3d_nearest_bev_iou, boxes_iou3d, boxes_iou3d_aligned, boxes_iou_bev,
                                      boxes_iou_bev_aligned)
from cmfiou_core.geometry.nms import class_agnostic_nms, multi_class_nms, nms_gpu
from cmfiou_core.geometry.points_in_boxes import points_in_boxes_first, points_in_boxes_mask
from cmfiou_core.model.grid_pool import get_voxel_centers, voxel2pinds, voxel_grid_params, voxel_query


def rand_boxes(n, gen, spread=6.0, dtype=torch.float64):
    b = torch.rand(n, 7, generator=gen, dtype=dtype)
    b[:, :2] = b[:, :2] * spread
    b[:, 2] = b[:, 2] * 2 - 1
    b[:, 3:6] = b[:, 3:6] * 3 + 0.1
    b[:, 6] = b[:, 6] * 4 * math.pi - 2 * math.pi
    return b


def shapely_inter(a, b):
    ca = boxes_bev_corners(a[None])[0].double().numpy()
    cb = boxes_bev_corners(b[None])[0].double().numpy()
    return Polygon(ca).intersection(Polygon(cb)).area


def shapely_iou_bev(a, b):
    i = shapely_inter(a, b)
    return i / max(float(a[3] * a[4] + b[3] * b[4]) - i, 1e-8)


def shapely_iou3d(a, b):
    i = shapely_inter(a, b)
    h = max(0.0, min(float(a[2] + a[5] / 2), float(b[2] + b[5] / 2)) - max(float(a[2] - a[5] / 2), float(b[2] - b[5] / 2)))
    inter = i * h
    return inter / max(float(a[3] * a[4] * a[5] + b[3] * b[4] * b[5]) - inter, 1e-6)


# ------------------------------------------------------------------------------------------------ coders
def test_residual_coder_roundtrip_and_formula():
    g = torch.Generator().manual_seed(0)
    anchors = rand_boxes(50, g, dtype=torch.float32)
    boxes = rand_boxes(50, g, dtype=torch.float32)
    c = ResidualCoder()
    enc = c.encode_torch(boxes, anchors)
    diag = torch.sqrt(anchors[:, 3] ** 2 + anchors[:, 4] ** 2)
    assert torch.allclose(enc[:, 0], (boxes[:, 0] - anchors[:, 0]) / diag)
    assert torch.allclose(enc[:, 2], (boxes[:, 2] - anchors[:, 2]) / anchors[:, 5])
    assert torch.allclose(enc[:, 3], torch.log(boxes[:, 3] / anchors[:, 3]))
    assert torch.allclose(enc[:, 6], boxes[:, 6] - anchors[:, 6])
    assert torch.allclose(c.decode_torch(enc, anchors), boxes, atol=1e-5)
    cs = ResidualCoder(encode_angle_by_sin=True)
    assert cs.code_size == 8
    dec = cs.decode_torch(cs.encode_torch(boxes, anchors), anchors)
    assert torch.allclose(torch.sin(dec[:, 6] - boxes[:, 6]), torch.zeros(50), atol=1e-5)
    # batched (B, N, 7) works
    assert c.decode_torch(enc.view(5, 10, 7), anchors.view(5, 10, 7)).shape == (5, 10, 7)


def test_add_sin_difference():
    a = torch.tensor([[0.0] * 6 + [0.3]])
    b = torch.tensor([[0.0] * 6 + [-0.2]])
    p, t = add_sin_difference(a, b)
    assert torch.allclose(p[:, 6] - t[:, 6], torch.sin(torch.tensor([0.5])))
    assert a[0, 6] == 0.3  # inputs untouched


# ------------------------------------------------------------------------------------------------ boxes
def test_limit_period_and_rotation():
    v = torch.tensor([3.5, -3.5, 0.1, math.pi])
    r = limit_period(v, 0.5, 2 * math.pi)
    assert torch.all(r >= -math.pi) and torch.all(r < math.pi)
    assert torch.allclose(torch.sin(r), torch.sin(v), atol=1e-6)
    assert isinstance(limit_period(np.array([4.0]), 0, math.pi), np.ndarray)
    p = torch.tensor([[[1.0, 0.0, 2.0, 7.0]]])
    q = rotate_points_along_z(p, torch.tensor([math.pi / 2]))
    assert torch.allclose(q, torch.tensor([[[0.0, 1.0, 2.0, 7.0]]]), atol=1e-6)


def test_rotation_precision_by_dtype():
    """float64 points + angles rotate with a float64 matrix (the numpy data path gets full precision); otherwise the
    matrix is rounded to float32 as in OpenPCDet."""
    gen = torch.Generator().manual_seed(3)
    p = torch.rand(4, 50, 3, generator=gen, dtype=torch.float64) * 100 - 50
    a = torch.rand(4, generator=gen, dtype=torch.float64) * 6 - 3
    c, s = torch.cos(a)[:, None], torch.sin(a)[:, None]
    ref = torch.stack([p[..., 0] * c - p[..., 1] * s, p[..., 0] * s + p[..., 1] * c, p[..., 2]], -1)
    assert (rotate_points_along_z(p, a) - ref).abs().max() < 1e-12
    q32 = rotate_points_along_z(p.float(), a.float())
    assert q32.dtype == torch.float32 and (q32.double() - ref).abs().max() < 1e-4
    mixed = rotate_points_along_z(p, a.float())  # float32 angles: float32 matrix, float64 points
    m32 = torch.stack((torch.cos(a.float()), torch.sin(a.float()), -torch.sin(a.float()), torch.cos(a.float())), 1)
    want = torch.stack([p[..., 0] * m32[:, None, 0].double() + p[..., 1] * m32[:, None, 2].double(),
                        p[..., 0] * m32[:, None, 1].double() + p[..., 1] * m32[:, None, 3].double(), p[..., 2]], -1)
    assert mixed.dtype == torch.float64 and (mixed - want).abs().max() < 1e-12
    nb = np.concatenate([p[0].numpy(), np.full((50, 3), 2.0), a[0].expand(50, 1).numpy()], 1)
    corners = boxes_to_corners_3d(nb)  # numpy float64 in -> numpy float64 out, exact to float64 precision
    assert corners.dtype == np.float64
    ca, sa = math.cos(float(a[0])), math.sin(float(a[0]))
    np.testing.assert_allclose(corners[:, 0, 0], nb[:, 0] + ca - sa, rtol=0, atol=1e-12)  # (+1, +1) local
    np.testing.assert_allclose(corners[:, 0, 1], nb[:, 1] + sa + ca, rtol=0, atol=1e-12)


def test_corners():
    b = torch.tensor([[1.0, 2.0, 3.0, 4.0, 2.0, 1.0, math.pi / 2]])
    c = boxes_to_corners_3d(b)[0]
    assert torch.allclose(c.mean(0), b[0, :3], atol=1e-6)
    # corner 0 = (+dx/2, +dy/2, -dz/2) rotated by 90 deg -> (-dy/2, +dx/2)
    assert torch.allclose(c[0], torch.tensor([1.0 - 1.0, 2.0 + 2.0, 2.5]), atol=1e-6)
    assert torch.allclose(c[4, 2], torch.tensor(3.5))


def _axis_calib():
    # LiDAR (x fwd, y left, z up) -> camera (x right, y down, z fwd), exact permutation, no translation
    Tr = np.array([[0, -1, 0, 0], [0, 0, -1, 0], [1, 0, 0, 0]], dtype=np.float64)
    P2 = np.array([[700.0, 0, 600, 0], [0, 700.0, 180, 0], [0, 0, 1, 0]])
    return Calibration(P2, np.eye(3), Tr)


def test_lidar_camera_roundtrip_and_alpha():
    calib = _axis_calib()
    b = torch.tensor([[10.0, 2.0, -0.8, 3.9, 1.6, 1.5, 0.4], [20.0, -5.0, -1.0, 0.8, 0.6, 1.7, -2.0]], dtype=torch.float64)
    cam = boxes3d_lidar_to_kitti_camera(b, calib)
    # exact axis permutation: camera x = -y, y = -(z - h/2), z = x; (l, h, w); ry = -heading - pi/2
    assert torch.allclose(cam[:, 0], -b[:, 1])
    assert torch.allclose(cam[:, 1], -(b[:, 2] - b[:, 5] / 2))
    assert torch.allclose(cam[:, 2], b[:, 0])
    assert torch.allclose(cam[:, 3:6], b[:, [3, 5, 4]])
    assert torch.allclose(cam[:, 6], -b[:, 6] - math.pi / 2)
    assert torch.allclose(boxes3d_kitti_camera_to_lidar(cam, calib), b, atol=1e-12)
    a = kitti_alpha(b, cam)
    assert torch.allclose(a, -torch.atan2(-b[:, 1], b[:, 0]) + cam[:, 6])
    # numpy in, numpy out
    assert isinstance(boxes3d_lidar_to_kitti_camera(b.numpy(), calib), np.ndarray)
    # 2D boxes = min/max of the projected LiDAR corners (exact for this calibration)
    box2d = boxes3d_kitti_camera_to_imageboxes(cam, calib)
    uv, _ = calib.lidar_to_img(boxes_to_corners_3d(b).reshape(-1, 3))
    uv = uv.reshape(-1, 8, 2)
    ref = torch.cat([uv.min(1).values, uv.max(1).values], 1)
    assert torch.allclose(box2d, ref, atol=1e-9)
    clipped = boxes3d_kitti_camera_to_imageboxes(cam, calib, (375, 1242))
    assert clipped[:, [0, 2]].min() >= 0 and clipped[:, [0, 2]].max() <= 1241
    out = lidar_boxes_to_kitti(b.numpy(), calib, (375, 1242))
    assert set(out) >= {"boxes_camera", "bbox", "alpha", "location", "dimensions", "rotation_y"}
    small = pad_small_image_boxes(torch.tensor([[0.0, 10.0, 5.0, 20.0], [0.0, 10.0, 5.0, 50.0]]))
    assert small[0, 3] == 22.0 and small[1, 3] == 50.0


# ------------------------------------------------------------------------------------------------ IoU
box_st = st.tuples(st.floats(-5, 5), st.floats(-5, 5), st.floats(-1, 1), st.floats(0.05, 6), st.floats(0.05, 6),
                   st.floats(0.05, 3), st.floats(-7, 7))


@settings(max_examples=200, deadline=None)
@given(st.lists(box_st, min_size=1, max_size=6), st.lists(box_st, min_size=1, max_size=6))
def test_rotated_iou_vs_shapely(la, lb):
    a = torch.tensor(la, dtype=torch.float64)
    b = torch.tensor(lb, dtype=torch.float64)
    ref_bev = np.array([[shapely_iou_bev(x, y) for y in b] for x in a])
    ref_3d = np.array([[shapely_iou3d(x, y) for y in b] for x in a])
    assert np.abs(boxes_iou_bev(a, b).numpy() - ref_bev).max() < 1e-9
    assert np.abs(boxes_iou3d(a, b).numpy() - ref_3d).max() < 1e-9
    assert np.abs(boxes_iou_bev(a.float(), b.float()).numpy() - ref_bev).max() < 2e-4
    n = min(len(a), len(b))
    assert np.abs(boxes_iou_bev_aligned(a[:n], b[:n]).numpy() - np.diag(ref_bev[:n, :n])).max() < 1e-9
    assert np.abs(boxes_iou3d_aligned(a[:n], b[:n]).numpy() - np.diag(ref_3d[:n, :n])).max() < 1e-9


def test_rotated_iou_special_cases():
    b = torch.tensor([[0.0, 0, 0, 4, 2, 1, 0.3], [0.0, 0, 0, 4, 2, 1, 0.3 + math.pi], [0.0, 0, 0, 2, 4, 1, 0.3 + math.pi / 2],
                      [100.0, 0, 0, 4, 2, 1, 0], [0.0, 0, 0, 2, 1, 1, 0.3], [2.0, 0, 0, 2, 2, 1, 0.0]], dtype=torch.float64)
    iou = boxes_iou_bev(b, b)
    assert torch.allclose(iou.diagonal(), torch.ones(6, dtype=torch.float64))
    assert torch.allclose(iou[0, 1:3], torch.ones(2, dtype=torch.float64))  # same rectangle, other parametrisation
    assert iou[0, 3] == 0
    assert abs(float(iou[0, 4]) - 0.25) < 1e-12  # nested
    for i in range(6):
        for j in range(6):
            assert abs(float(iou[i, j]) - shapely_iou_bev(b[i], b[j])) < 1e-12
    # large coordinates in float32 stay accurate (mid-point shift)
    far = b.clone().float()
    far[:, 0] += 1000.0
    assert (boxes_iou_bev(far, far) - iou.float()).abs().max() < 1e-3
    # empty inputs
    assert boxes_iou_bev(b[:0], b).shape == (0, 6)


def test_nearest_bev_iou_bruteforce():
    g = torch.Generator().manual_seed(1)
    a, b = rand_boxes(30, g), rand_boxes(20, g)
    got = boxes3d_nearest_bev_iou(a, b)
    for i in range(30):
        for j in range(20):
            def aabb(x):
                r = abs(float(limit_period(x[6:7], 0.5, math.pi)[0]))
                dx, dy = (float(x[3]), float(x[4])) if r < math.pi / 4 else (float(x[4]), float(x[3]))
                return float(x[0]) - dx / 2, float(x[1]) - dy / 2, float(x[0]) + dx / 2, float(x[1]) + dy / 2
            p, q = aabb(a[i]), aabb(b[j])
            iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
            ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
            inter = iw * ih
            ref = inter / max((p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter, 1e-6)
            assert abs(float(got[i, j]) - ref) < 1e-9


# ------------------------------------------------------------------------------------------------ NMS
def nms_bruteforce(boxes, scores, thr):
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    removed = [False] * len(order)
    keep = []
    for a in range(len(order)):
        if removed[a]:
            continue
        keep.append(order[a])
        for b in range(a + 1, len(order)):
            if not removed[b] and shapely_iou_bev(boxes[order[a]], boxes[order[b]]) > thr:
                removed[b] = True
    return keep


@pytest.mark.parametrize("thr", [0.0, 0.1, 0.3, 0.5, 0.75])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nms_vs_bruteforce(thr, seed):
    g = torch.Generator().manual_seed(seed)
    boxes = rand_boxes(80, g, spread=8.0)
    scores = torch.randperm(80, generator=g).double()  # distinct scores: unique order
    keep = nms_gpu(boxes, scores, thr)
    assert keep.tolist() == nms_bruteforce(boxes, scores, thr)
    # post_max_size truncates the same sequence
    assert nms_gpu(boxes, scores, thr, post_max_size=5).tolist() == keep[:5].tolist()


def test_nms_strict_threshold_and_wrappers():
    boxes = torch.tensor([[0.0, 0, 0, 2, 2, 1, 0], [1.0, 0, 0, 2, 2, 1, 0], [10.0, 0, 0, 2, 2, 1, 0]])
    # IoU(0, 1) = 2 / 6 = 1/3 exactly: not suppressed at thr 1/3 (strict >), suppressed below
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert nms_gpu(boxes, scores, 1.0 / 3.0).tolist() == [0, 1, 2]
    assert nms_gpu(boxes, scores, 0.3).tolist() == [0, 2]
    sel, sc = class_agnostic_nms(scores, boxes, 0.3, 4096, 500, score_thresh=0.75)
    assert sel.tolist() == [0] and torch.allclose(sc, torch.tensor([0.9]))
    labels = torch.tensor([1, 2, 1])
    sel, _ = multi_class_nms(scores, boxes, labels, [0.3, 0.3, 0.3], [10] * 3, [10] * 3)
    assert sorted(sel.tolist()) == [0, 1, 2]  # different classes never suppress each other
    assert nms_gpu(boxes[:0], scores[:0], 0.1).numel() == 0


# ------------------------------------------------------------------------------------------------ points in boxes
def test_points_in_boxes_bruteforce():
    g = torch.Generator().manual_seed(3)
    boxes = rand_boxes(15, g).float()
    pts = torch.rand(2000, 3, generator=g) * torch.tensor([8.0, 8.0, 4.0]) - torch.tensor([1.0, 1.0, 2.0])
    got = points_in_boxes_mask(pts, boxes)
    ref = torch.zeros_like(got)
    for j in range(15):
        cx, cy, cz, dx, dy, dz, h = [float(v) for v in boxes[j]]
        for i in range(2000):
            x, y, z = [float(v) for v in pts[i]]
            sx, sy = x - cx, y - cy
            lx = sx * math.cos(-h) - sy * math.sin(-h)
            ly = sx * math.sin(-h) + sy * math.cos(-h)
            ref[i, j] = abs(z - cz) <= dz / 2 and -dx / 2 < lx < dx / 2 and -dy / 2 < ly < dy / 2
    mismatch = (got != ref).sum().item()
    assert mismatch <= 2  # float rounding exactly on a face
    first = points_in_boxes_first(pts, boxes)
    anyin = got.any(1)
    assert torch.all((first >= 0) == anyin)
    assert torch.all(got[anyin].float().argmax(1) == first[anyin])


def test_points_in_boxes_numpy_path_bruteforce():
    """numpy input -> the data path's float64 x-sorted path (one function, one predicate): equal to a float64
    brute-force loop, strict in BEV and inclusive in z (points placed exactly on faces), and to the dense torch
    float64 path; float32 numpy input is evaluated in float64."""
    rng = np.random.default_rng(5)
    M = 12
    boxes = np.c_[rng.uniform(-4, 4, (M, 3)), rng.choice([1.0, 2.0, 3.0], (M, 3)), np.zeros((M, 1))]
    boxes[:, :3] = np.round(boxes[:, :3])
    boxes[M // 2:, 6] = rng.uniform(-3, 3, M - M // 2)  # half rotated, half axis-aligned (exact faces)
    pts = np.round(rng.uniform(-6, 6, (3000, 4)) * 2) / 2  # half-metre grid: many points exactly on faces
    pts = np.r_[pts, rng.uniform(-6, 6, (3000, 4))]
    got = points_in_boxes_mask(pts, boxes)
    assert isinstance(got, np.ndarray) and got.dtype == bool and got.shape == (6000, M)
    ref = np.zeros_like(got)
    for j in range(M):
        cx, cy, cz, dx, dy, dz, h = (float(v) for v in boxes[j])
        ca, sa = math.cos(-h), math.sin(-h)
        for i in range(pts.shape[0]):
            x, y, z = (float(v) for v in pts[i, :3])
            lx = (x - cx) * ca - (y - cy) * sa
            ly = (x - cx) * sa + (y - cy) * ca
            ref[i, j] = abs(z - cz) <= dz / 2 and -dx / 2 < lx < dx / 2 and -dy / 2 < ly < dy / 2
    assert np.array_equal(got, ref)
    aligned = boxes[:, 6] == 0
    on_z_face = np.isclose(np.abs(pts[:, None, 2] - boxes[None, :, 2]), boxes[None, :, 5] / 2)[:, aligned]
    on_x_face = np.isclose(np.abs(pts[:, None, 0] - boxes[None, :, 0]), boxes[None, :, 3] / 2)[:, aligned]
    assert (got[:, aligned] & on_z_face).any()  # inclusive in z: face points are inside ...
    assert not (got[:, aligned] & on_x_face).any()  # ... strict in BEV: none on an x face is
    dense = points_in_boxes_mask(torch.from_numpy(pts), torch.from_numpy(boxes))
    assert torch.equal(dense, torch.from_numpy(got))
    np.testing.assert_array_equal(points_in_boxes_mask(pts.astype(np.float32), boxes),
                                  points_in_boxes_mask(pts.astype(np.float32).astype(np.float64), boxes))
    assert points_in_boxes_mask(pts[:0], boxes).shape == (0, M)
    assert points_in_boxes_mask(pts, boxes[:0]).shape == (6000, 0)


# ------------------------------------------------------------------------------------------------ voxel query
def voxel_query_loop(coords, new_xyz, vxyz, v2p, rng, radius, nsample):
    B, Z, Y, X = v2p.shape
    r2 = np.float32(radius) * np.float32(radius)
    idx = np.zeros((len(coords), nsample), dtype=np.int64)
    empty = np.zeros(len(coords), dtype=bool)
    for m in range(len(coords)):
        b, cz, cy, cx = [int(v) for v in coords[m]]
        cnt = 0
        done = False
        for dz in range(-rng[0], rng[0] + 1):
            z = cz + dz
            if z < 0 or z >= Z:
                continue
            for dy in range(-rng[1], rng[1] + 1):
                y = cy + dy
                if y < 0 or y >= Y:
                    continue
                for dx in range(-rng[2], rng[2] + 1):
                    x = cx + dx
                    if x < 0 or x >= X:
                        continue
                    n = int(v2p[b, z, y, x])
                    if n < 0:
                        continue
                    ddx = np.float32(vxyz[n, 0]) - np.float32(new_xyz[m, 0])
                    ddy = np.float32(vxyz[n, 1]) - np.float32(new_xyz[m, 1])
                    ddz = np.float32(vxyz[n, 2]) - np.float32(new_xyz[m, 2])
                    d2 = np.float32(np.float32(ddx * ddx) + np.float32(ddy * ddy)) + np.float32(ddz * ddz)
                    if d2 > r2:
                        continue
                    if cnt == 0:
                        idx[m, :] = n
                    idx[m, cnt] = n
                    cnt += 1
                    if cnt >= nsample:
                        done = True
                        break
                if done:
                    break
            if done:
                break
        if cnt == 0:
            empty[m] = True
            idx[m, :] = 0
    return idx, empty


@pytest.mark.parametrize("seed", range(6))
def test_voxel_query_vs_loop(seed):
    rs = np.random.RandomState(seed)
    B = rs.randint(1, 3)
    Z, Y, X = rs.randint(3, 9, size=3)
    occ = rs.rand(B, Z, Y, X) < 0.4
    ind = np.argwhere(occ).astype(np.int32)  # b, z, y, x (lexicographic)
    vs = 0.2
    vxyz = ((ind[:, [3, 2, 1]] + 0.5) * vs).astype(np.float32)
    v2p = voxel2pinds(torch.from_numpy(ind), (Z, Y, X), B)
    M = 150
    coords = np.stack([rs.randint(0, B, M), rs.randint(-2, Z + 2, M), rs.randint(-2, Y + 2, M),
                       rs.randint(-2, X + 2, M)], 1)
    new_xyz = ((coords[:, [3, 2, 1]] + rs.rand(M, 3)) * vs).astype(np.float32)
    stride, gvs, gpc = 2, [0.1, 0.1, 0.1], [0.03, -0.07, 0.011]
    grid = voxel_grid_params(stride, gvs, gpc)
    vxyz_g = get_voxel_centers(torch.from_numpy(ind[:, 1:4]), stride, gvs, gpc)
    for rng in ([0, 0, 0], [1, 1, 1], [2, 1, 2]):
        for radius in (0.15, 0.3, 0.45):
            for ns in (1, 3, 8):
                idx, empty = voxel_query(torch.from_numpy(coords).int(), torch.from_numpy(new_xyz),
                                         torch.from_numpy(vxyz), v2p, rng, radius, ns)
                ri, re = voxel_query_loop(coords, new_xyz, vxyz, v2p.numpy(), rng, radius, ns)
                assert np.array_equal(idx.numpy(), ri) and np.array_equal(empty.numpy(), re)
                # separable distances from the grid parameters (roi_grid_pool's path) == distances to the centres
                idx, empty = voxel_query(torch.from_numpy(coords).int(), torch.from_numpy(new_xyz), vxyz_g, v2p,
                                         rng, radius, ns, grid=grid)
                ri, re = voxel_query_loop(coords, new_xyz, vxyz_g.numpy(), v2p.numpy(), rng, radius, ns)
                assert np.array_equal(idx.numpy(), ri) and np.array_equal(empty.numpy(), re)


def test_rotated_iou_touching_and_collinear_edges():
    """Shared/collinear edges, touching boxes, 90-degree turns and near-coincident corners vs shapely."""
    worst = {torch.float64: 0.0, torch.float32: 0.0}
    for h in (0.0, math.pi / 2, math.pi / 4, 0.3, math.pi):
        for dx in (0.0, 0.5, 1.0, 2.0, 1e-7, 2 - 1e-7):
            for dy in (0.0, 1.0, 0.5):
                for sx, sy in ((2, 1), (2, 2), (1, 1)):
                    pairs = [([0, 0, 0, 2, 1, 1, h], [dx * math.cos(h) - dy * math.sin(h),
                                                      dx * math.sin(h) + dy * math.cos(h), 0, sx, sy, 1, h]),
                             ([0, 0, 0, 2, 1, 1, h], [dx, dy, 0, sx, sy, 1, h + math.pi / 2])]
                    for a, b in pairs:
                        ref = shapely_iou_bev(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
                        for dt in worst:
                            got = float(boxes_iou_bev(torch.tensor([a], dtype=dt), torch.tensor([b], dtype=dt))[0, 0])
                            worst[dt] = max(worst[dt], abs(got - ref))
    assert worst[torch.float64] < 1e-12 and worst[torch.float32] < 1e-5


def test_nms_lazy_equals_matrix():
    from cmfiou_core.geometry.nms import nms_sorted
    g = torch.Generator().manual_seed(7)
    boxes = rand_boxes(300, g, spread=10.0).float()
    for thr in (0.1, 0.5, 0.8):
        a = nms_sorted(boxes, thr, mode="lazy")
        b = nms_sorted(boxes, thr, mode="matrix")
        assert a.tolist() == b.tolist()
        assert nms_sorted(boxes, thr, 20, mode="matrix").tolist() == a[:20].tolist()


def test_device_const_is_built_once_per_values_dtype_device():
    import torch
    from cmfiou_core.device_const import device_const
    a = device_const((1.0, -1.0, 0.5), torch.float32, "cpu")
    assert torch.equal(a, torch.tensor([1.0, -1.0, 0.5]))
    assert device_const([1.0, -1.0, 0.5], torch.float32, torch.device("cpu")) is a  # same key -> same tensor
    b = device_const((1.0, -1.0, 0.5), torch.float64, "cpu")
    assert b is not a and b.dtype == torch.float64
    assert device_const((2, 3), torch.int64, "cpu").tolist() == [2, 3]


# ------------------------------------------------------------------------------------------------ rotations
def test_quaternion_matrix_round_trip_against_scipy():
    """geometry.rotation (the one quaternion <-> matrix code) against scipy's Rotation, on random rotations and on the
    half-turns that take every branch of the matrix -> quaternion conversion."""
    from scipy.spatial.transform import Rotation

    from cmfiou_core.geometry.rotation import matrix_to_quaternion, nearest_rotation, quaternion_to_matrix

    rots = list(Rotation.random(200, random_state=5)) + [Rotation.from_rotvec(np.pi * np.eye(3)[i]) for i in range(3)]
    for r in rots:
        q = r.as_quat()  # (x, y, z, w)
        np.testing.assert_allclose(quaternion_to_matrix(q), r.as_matrix(), atol=1e-12)
        got = np.array(matrix_to_quaternion(r.as_matrix()))
        assert min(np.abs(got - q).max(), np.abs(got + q).max()) < 1e-9  # q and -q are one rotation
    R = Rotation.random(random_state=1).as_matrix()
    noisy = R + 1e-4 * np.random.default_rng(0).normal(size=(3, 3))
    n = nearest_rotation(noisy)
    np.testing.assert_allclose(n @ n.T, np.eye(3), atol=1e-12)
    assert np.abs(n - R).max() < 1e-3 and np.linalg.det(n) > 0
    with pytest.raises(ValueError, match="zero"):
        quaternion_to_matrix([0, 0, 0, 0])
    with pytest.raises(ValueError, match="unit length"):
        quaternion_to_matrix([0, 0, 0, 2], unit_tol=1e-3)
    np.testing.assert_allclose(quaternion_to_matrix([0, 0, 0, 2]), np.eye(3))  # normalised without unit_tol


def test_yaw_quaternion_against_scipy():
    """geometry.rotation's yaw <-> quaternion (detections' orientation, the bag writer, bag evaluation) against
    scipy: the quaternion of a rotation about +z, and the yaw back from it and from a message-like object."""
    from types import SimpleNamespace

    from scipy.spatial.transform import Rotation

    from cmfiou_core.geometry.rotation import quaternion_to_yaw, yaw_to_quaternion

    for yaw in np.r_[np.random.default_rng(3).uniform(-np.pi, np.pi, 100), 0.0, np.pi / 2, -np.pi / 2, 3.1]:
        q = np.array(yaw_to_quaternion(float(yaw)))
        ref = Rotation.from_euler("z", yaw).as_quat()
        assert min(np.abs(q - ref).max(), np.abs(q + ref).max()) < 1e-12
        assert abs(quaternion_to_yaw(q) - yaw) < 1e-12
        msg = SimpleNamespace(**dict(zip("xyzw", ref)))
        assert abs(quaternion_to_yaw(msg) - Rotation.from_quat(ref).as_euler("xyz")[2]) < 1e-12
