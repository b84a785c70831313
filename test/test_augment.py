"""Augmentation invariants on real KITTI frames (raw + pseudo 8-col clouds), step by step.

A 9th column carries a point id (pasted DB points get -1), so every step can be checked point by point.
"""
import copy
import math
from dataclasses import replace

import numpy as np
import pytest

from cmfiou_core.data import augment as A
from cmfiou_core.data.kitti import KittiDataset
from cmfiou_core.geometry.points_in_boxes import points_in_boxes_mask
from test_kitti_dataset import kitti_root  # noqa: F401  (session fixture: a writable root of real frames)


@pytest.fixture(scope="module")
def samples(kitti_root):  # noqa: F811
    ds = KittiDataset(kitti_root, "train", training=True, seed=0)
    out = []
    for i in range(len(ds)):
        d = ds.load_sample(i)
        p = np.asarray(d["points"], dtype=np.float64)
        d["points"] = np.concatenate([p, np.arange(p.shape[0], dtype=np.float64)[:, None]], 1)
        d["valid_noise"] = np.zeros(d["gt_boxes"].shape[0], dtype=np.int64)
        out.append(d)
    return ds, out


def _fresh(samples, i):
    return copy.deepcopy(samples[1][i])


def _ids_in_boxes(d, boxes=None):
    boxes = d["gt_boxes"] if boxes is None else boxes
    m = points_in_boxes_mask(d["points"], boxes)
    return [set(d["points"][m[:, k], 8].astype(int).tolist()) for k in range(boxes.shape[0])]


def _local_norm(pts, box):
    return A.to_box_frame(pts[:, :3], box) / (box[3:6] / 2)


def test_world_transform_inverse_exact(samples):
    rng = np.random.default_rng(0)
    for i in range(len(samples[1])):
        d = _fresh(samples, i)
        p0, b0 = d["points"].copy(), d["gt_boxes"].copy()
        d = A.random_world(d, A.AugmentConfig(), rng)
        rot, flip, scale = d["aug_param"]
        assert abs(rot) <= math.pi / 4 and flip in (0.0, 1.0) and 0.95 <= scale <= 1.05
        p, b = A.inverse_world_transform(d["points"], d["gt_boxes"], rot, flip, scale)
        np.testing.assert_allclose(p, p0, atol=1e-5, rtol=0)
        np.testing.assert_allclose(b[:, :6], b0[:, :6], atol=1e-5, rtol=0)
        np.testing.assert_allclose(A.wrap_heading(b[:, 6] - b0[:, 6]), 0, atol=1e-9)
    # also flip=1 explicitly
    d = _fresh(samples, 0)
    p, b = A.world_transform(d["points"], d["gt_boxes"], 0.3, 1.0, 1.04)
    p2, b2 = A.inverse_world_transform(p, b, 0.3, 1.0, 1.04)
    np.testing.assert_allclose(p2, d["points"], atol=1e-9)
    np.testing.assert_allclose(b2, d["gt_boxes"], atol=1e-9)


def test_world_transform_against_scipy():
    """world_transform (geometry.view_transform in float64) against an independent construction: scipy's rotation
    about z, then y negated when flipped, then scaling; a transformed box has the transformed corners of the original
    (so its heading is right for either flip); extra point columns pass through untouched."""
    from scipy.spatial.transform import Rotation

    from cmfiou_core.geometry.boxes import boxes_to_corners_3d
    rng = np.random.default_rng(5)
    pts = np.concatenate([rng.uniform(-70, 70, (500, 2)), rng.uniform(-3, 2, (500, 1)), rng.normal(0, 1, (500, 6))], 1)
    boxes = np.concatenate([rng.uniform(-60, 60, (20, 2)), rng.uniform(-2, 0, (20, 1)), rng.uniform(0.5, 5, (20, 3)),
                            rng.uniform(-np.pi, np.pi, (20, 1))], 1)
    for rot, flip, scale in ((0.3, 0.0, 1.04), (-0.7, 1.0, 0.95), (np.pi / 4, 1.0, 1.0), (0.0, 0.0, 1.05)):
        def ref(xyz):
            out = Rotation.from_euler("z", rot).apply(xyz)
            if flip:
                out[:, 1] = -out[:, 1]
            return out * scale
        p, b = A.world_transform(pts, boxes, rot, flip, scale)
        np.testing.assert_allclose(p[:, :3], ref(pts[:, :3]), rtol=0, atol=1e-11)
        assert np.array_equal(p[:, 3:], pts[:, 3:])
        np.testing.assert_allclose(b[:, :3], ref(boxes[:, :3]), rtol=0, atol=1e-11)
        np.testing.assert_allclose(b[:, 3:6], boxes[:, 3:6] * scale, rtol=1e-15, atol=0)
        moved = ref(boxes_to_corners_3d(boxes).reshape(-1, 3)).reshape(-1, 8, 3)
        gap = np.linalg.norm(boxes_to_corners_3d(b)[:, :, None] - moved[:, None], axis=3)  # (M, 8, 8)
        assert (gap.min(axis=2) < 1e-9).all() and (np.sort(gap.argmin(axis=2), axis=1) == np.arange(8)).all()


def test_world_steps_keep_points_in_boxes(samples):
    rng = np.random.default_rng(1)
    for i in range(len(samples[1])):
        d = _fresh(samples, i)
        before = _ids_in_boxes(d)
        norm0 = [_local_norm(d["points"][points_in_boxes_mask(d["points"], d["gt_boxes"][k:k + 1])[:, 0]],
                             d["gt_boxes"][k]) for k in range(d["gt_boxes"].shape[0])]
        for step in (A.random_world, A.random_local_trans):
            d = step(d, A.AugmentConfig(), rng)
            assert _ids_in_boxes(d) == before, step.__name__
        for k in range(d["gt_boxes"].shape[0]):
            box = d["gt_boxes"][k]
            sel = points_in_boxes_mask(d["points"], box[None])[:, 0]
            n1 = _local_norm(d["points"][sel], box)
            if d["aug_param"][1]:  # a flip mirrors the box frame: local y changes sign
                n1[:, 1] = -n1[:, 1]
            np.testing.assert_allclose(n1, norm0[k], atol=1e-9)
        # the global shift is recorded separately (not in aug_param)
        assert d["local_trans"].shape == (3,) and np.all(np.abs(d["local_trans"]) <= [0.5, 0.5, 0.1])


def test_gt_sampling(samples):
    ds, _ = samples
    db = ds.augmentor.db
    cfg = replace(A.GTSamplingConfig(), sample_groups=(("Car", 15), ("Pedestrian", 15), ("Cyclist", 15), ("Van", 5)),
                  min_points=(("Car", 5), ("Cyclist", 5), ("Van", 5)))
    pasted_total = 0
    for seed in range(4):
        for i in range(len(samples[1])):
            d = _fresh(samples, i)
            n0 = d["gt_boxes"].shape[0]
            scene_ids = d["points"][:, 8].copy()
            d = A.gt_sampling(d, db, cfg, np.random.default_rng(seed))
            boxes = d["gt_boxes"]
            new = boxes[n0:]
            pasted_total += new.shape[0]
            assert np.all(d["valid_noise"][:n0] == 0) and np.all(d["valid_noise"][n0:] == 1)
            if new.shape[0] == 0:
                continue
            # no BEV overlap of pasted boxes with existing ones or with each other
            assert A.iou_bev_np(new, boxes[:n0]).max(initial=0) == 0
            iou = A.iou_bev_np(new, new)
            np.fill_diagonal(iou, 0)
            assert iou.max() == 0
            # scene points inside the (shrunk-in-z) pasted boxes were removed
            scene = d["points"][d["points"][:, 8] >= 0]
            big = A.enlarge_boxes(new, cfg.remove_extra_width)
            assert not points_in_boxes_mask(scene, big).any()
            assert set(scene[:, 8].astype(int)) <= set(scene_ids.astype(int))
            # each pasted object: all its DB points, box-relative coordinates preserved
            pasted = d["points"][d["points"][:, 8] < 0]
            names = d["gt_names"][n0:]
            owner = points_in_boxes_mask(pasted, new)
            for k in range(new.shape[0]):
                cand = [o for o in db.infos[names[k]]
                        if np.allclose(np.array(o["box3d_lidar"])[[0, 1, 3, 4, 5, 6]], new[k, [0, 1, 3, 4, 5, 6]])]
                assert cand, "pasted box must come from the DB"
                ref = db.load(cand[0]).astype(np.float64)
                got = pasted[owner[:, k]]
                assert abs(got.shape[0] - ref.shape[0]) <= max(1, 0.01 * ref.shape[0])
                rel = got[:, :3] - new[k, :3]
                rel_sorted = rel[np.lexsort(rel.T)]
                ref_sorted = ref[np.lexsort(ref[:, :3].T), :3]
                if got.shape[0] == ref.shape[0]:
                    np.testing.assert_allclose(rel_sorted, ref_sorted, atol=1e-5)
    assert pasted_total > 0


def test_road_plane_and_da_sampling(samples):
    ds, _ = samples
    db = ds.augmentor.db
    # boxes land on a (tilted) road plane
    calib = samples[1][0]["calib"]
    plane = np.array([0.01, -1.0, 0.02, 1.6])
    plane /= np.linalg.norm(plane[:3])
    boxes = np.array([[10.0, 2.0, 0.5, 4.0, 1.7, 1.5, 0.3], [25.0, -3.0, -2.0, 0.8, 0.6, 1.7, 1.0]])
    moved, mv = A.put_boxes_on_road_plane(boxes, plane, calib)
    bottom = moved[:, :3].copy()
    bottom[:, 2] -= moved[:, 5] / 2
    rect = calib.lidar_to_rect(bottom)
    # OpenPCDet moves along LiDAR z to the height found along rect y: exact up to the frames' tilt (< 1 mm)
    np.testing.assert_allclose(rect @ plane[:3] + plane[3], 0, atol=1e-3)
    np.testing.assert_allclose(boxes[:, 2] - moved[:, 2], mv)
    # LiDAR-aware resampling: one point per (theta, phi) bin, subset of the input
    cfg = A.DASamplingConfig()
    rng = np.random.default_rng(0)
    info = max(db.infos["Car"], key=lambda o: o["num_points_all"])
    box = np.array(info["box3d_lidar"])
    pts = db.load(info).astype(np.float64)
    pts[:, :3] += box[:3]
    out = A.lidar_aware_sample(pts, box, cfg, rng)
    assert 5 <= out.shape[0] <= pts.shape[0]
    r = np.linalg.norm(out[:, :3], axis=1)
    key = np.stack([np.floor(np.arccos(out[:, 2] / r) / cfg.vert_res),
                    np.floor(np.arctan2(out[:, 1], out[:, 0]) / cfg.hor_res)], 1)
    assert np.unique(key, axis=0).shape[0] == out.shape[0]
    assert set(map(tuple, out.round(6))) <= set(map(tuple, pts.round(6)))
    # dense pseudo points are thinned a lot
    assert out.shape[0] < 0.8 * pts.shape[0]
    # VirConv quirk reproduced: no x shift; fixed: shift in [min, max]
    d = _fresh(samples, 0)
    n0 = d["gt_boxes"].shape[0]
    d = A.gt_sampling(d, db, cfg, np.random.default_rng(2), da=cfg)
    db_x = {round(o["box3d_lidar"][0], 6) for lst in db.infos.values() for o in lst}
    assert all(round(x, 6) in db_x for x in d["gt_boxes"][n0:, 0])
    fixed = replace(cfg, fix_sampling_dis=True)
    d = _fresh(samples, 0)
    d = A.gt_sampling(d, db, fixed, np.random.default_rng(2), da=fixed)
    assert d["gt_boxes"].shape[0] >= n0


def test_local_noise_moves_points_rigidly(samples):
    for i in range(len(samples[1])):
        d = _fresh(samples, i)
        d["valid_noise"][:] = 1
        b0 = d["gt_boxes"].copy()
        inside0 = points_in_boxes_mask(d["points"], b0)
        big = points_in_boxes_mask(d["points"], A.enlarge_boxes(b0, (0.2, 0.2, 0.0))).any(1)
        loc0 = [A.to_box_frame(d["points"][inside0[:, k]], b0[k]) for k in range(b0.shape[0])]
        ids0 = [d["points"][inside0[:, k], 8] for k in range(b0.shape[0])]
        p_out0 = d["points"][~big].copy()
        d = A.random_local_noise(d, A.AugmentConfig(), np.random.default_rng(i))
        b1 = d["gt_boxes"]
        assert not np.allclose(b0, b1)
        np.testing.assert_array_equal(d["points"][~big], p_out0)  # points outside all boxes untouched
        pos = {int(v): j for j, v in enumerate(d["points"][:, 8])}
        for k in range(b0.shape[0]):
            pts = d["points"][[pos[int(v)] for v in ids0[k]]]
            np.testing.assert_allclose(A.to_box_frame(pts, b1[k]), loc0[k], atol=1e-9)
            assert points_in_boxes_mask(pts, b1[k:k + 1]).all()
        iou = A.iou_bev_np(b1, b1)
        np.fill_diagonal(iou, 0)
        iou0 = A.iou_bev_np(b0, b0)
        np.fill_diagonal(iou0, 0)
        moved = np.any(b0 != b1, axis=1)
        assert iou[moved].max(initial=0) == 0 or iou0.max() > 0


def test_pyramid_dropout_sparsify_swap(samples):
    only = dict(pyramid_dropout_prob=0.0, pyramid_sparsify_prob=0.0, pyramid_swap_prob=0.0)
    n_drop = n_sparse = n_swap = 0
    for i in range(len(samples[1])):
        d0 = _fresh(samples, i)
        owner0, pyr0, norm0 = A.pyramid_labels(d0["points"], d0["gt_boxes"])
        outside = d0["points"][owner0 < 0]
        # dropout with p = 1: each box loses exactly the points of one pyramid
        d = A.random_local_pyramid_aug(copy.deepcopy(d0), A.AugmentConfig(**{**only, "pyramid_dropout_prob": 1.0}),
                                       np.random.default_rng(i))
        kept = set(d["points"][:, 8].astype(int))
        for k in range(d0["gt_boxes"].shape[0]):
            lost = {int(p) for p in np.unique(pyr0[(owner0 == k) & ~np.isin(d0["points"][:, 8], list(kept))])}
            assert len(lost) <= 1
            if lost:
                n_drop += 1
                p = lost.pop()
                assert not np.any(np.isin(d0["points"][(owner0 == k) & (pyr0 == p), 8], list(kept)))
        np.testing.assert_array_equal(d["points"][np.isin(d["points"][:, 8], outside[:, 8])], outside)
        # sparsify with p = 1: the chosen pyramid keeps at most 50 points, nothing else changes
        d = A.random_local_pyramid_aug(copy.deepcopy(d0), A.AugmentConfig(**{**only, "pyramid_sparsify_prob": 1.0}),
                                       np.random.default_rng(i))
        owner1, pyr1, _ = A.pyramid_labels(d["points"], d["gt_boxes"])
        for k in range(d0["gt_boxes"].shape[0]):
            c0 = np.bincount(pyr0[owner0 == k], minlength=6)
            c1 = np.bincount(pyr1[owner1 == k], minlength=6)
            changed = np.nonzero(c0 != c1)[0]
            assert len(changed) <= 1
            for p in changed:
                n_sparse += 1
                assert c0[p] > 50 and c1[p] == 50
        # swap with p = 1: recipient pyramid = donor pyramid points in normalised box coordinates
        d = A.random_local_pyramid_aug(copy.deepcopy(d0), A.AugmentConfig(**{**only, "pyramid_swap_prob": 1.0}),
                                       np.random.default_rng(i))
        np.testing.assert_array_equal(d["points"][np.isin(d["points"][:, 8], outside[:, 8])], outside)
        owner2, pyr2, norm2 = A.pyramid_labels(d["points"], d["gt_boxes"])
        for k in range(d0["gt_boxes"].shape[0]):
            for p in range(6):
                ids_now = np.sort(d["points"][(owner2 == k) & (pyr2 == p), 8])
                ids_before = np.sort(d0["points"][(owner0 == k) & (pyr0 == p), 8])
                if np.array_equal(ids_now, ids_before):
                    continue
                # swapped in: the ids are those of another box's same pyramid, at the same normalised coordinates
                src = d0["points"][np.isin(d0["points"][:, 8], ids_now)]
                donor = np.unique(owner0[np.isin(d0["points"][:, 8], ids_now)])
                assert donor.size == 1 and donor[0] != k
                n_swap += 1
                got = norm2[(owner2 == k) & (pyr2 == p)]
                ref = norm0[np.isin(d0["points"][:, 8], ids_now)]
                gs, rs = got[np.lexsort(got.T)], ref[np.lexsort(ref.T)]
                if gs.shape == rs.shape:
                    np.testing.assert_allclose(gs, rs, atol=1e-6)
                assert src.shape[0] >= 50  # swap threshold
    assert n_drop > 3 and n_sparse > 3 and n_swap > 3


def test_full_chain(samples):
    ds, _ = samples
    for seed in range(3):
        for i in range(len(samples[1])):
            d = _fresh(samples, i)
            p0 = d["points"].copy()
            d = ds.augmentor(d, np.random.default_rng(seed))
            b = d["gt_boxes"]
            assert np.all(b[:, 6] >= -np.pi) and np.all(b[:, 6] < np.pi)
            assert d["aug_param"].shape == (3,) and d["points"].shape[1] == 9
            assert len(d["gt_names"]) == b.shape[0] == len(d["valid_noise"])
            # scene points far from every final box: undo local_trans + world transform -> original, to 1e-5
            dist = np.linalg.norm(d["points"][:, None, :2] - b[None, :, :2], axis=2) - \
                np.hypot(b[:, 3], b[:, 4])[None] / 2 if b.shape[0] else np.full((d["points"].shape[0], 1), 99.0)
            far = (dist.min(1) > 3.0) & (d["points"][:, 8] >= 0)
            ids = d["points"][far, 8].astype(int)
            q = d["points"][far].copy()
            q[:, :3] -= d["local_trans"]
            rot, flip, scale = d["aug_param"]
            q, _ = A.inverse_world_transform(q, np.zeros((0, 7)), rot, flip, scale)
            np.testing.assert_allclose(q[:, :8], p0[ids, :8], atol=1e-5)
            assert far.sum() > 1000


def test_config_validation():
    cfg = A.AugmentConfig.from_dict({"gt_sampling": {"sample_groups": {"Car": 5}}, "pyramid": False,
                                     "da_sampling": {"fix_sampling_dis": True}})
    assert cfg.gt_sampling.sample_groups == (("Car", 5),) and not cfg.pyramid and cfg.da_sampling.fix_sampling_dis
    from cmfiou_core.config import ConfigError

    with pytest.raises(ConfigError, match="pyramidd"):
        A.AugmentConfig.from_dict({"pyramidd": True})
    with pytest.raises(ConfigError, match="sample_groups"):
        A.AugmentConfig.from_dict({"gt_sampling": {"sample_groups": [1, 2]}})


def test_photometric_changes_only_pseudo_colours(samples):
    """random_photometric on real frames: raw rows, geometry, flags and ids stay bit-identical; pseudo colours move by
    a frame-wide camera response (brightness, grey, noise) and stay in the 8-bit range; off, no random draw is made."""
    ds, _ = samples
    d0 = _fresh(samples, 0)
    ps = d0["points"][:, 7] == 1
    assert ps.sum() > 1000 and (~ps).sum() > 1000
    cfg = replace(A.AugmentConfig(), photometric=True)
    means = []
    for seed in range(6):
        d = A.random_photometric(copy.deepcopy(d0), cfg, np.random.default_rng(seed))
        p = d["points"]
        np.testing.assert_array_equal(p[~ps], d0["points"][~ps])
        np.testing.assert_array_equal(p[:, [0, 1, 2, 3, 7, 8]], d0["points"][:, [0, 1, 2, 3, 7, 8]])
        assert p[ps, 4:7].min() >= 0.0 and p[ps, 4:7].max() <= 85.0
        assert np.abs(p[ps, 4:7] - d0["points"][ps, 4:7]).mean() > 0.5   # more than the noise alone
        means.append(p[ps, 4:7].mean())
    assert np.ptp(means) > 2.0                                          # the frame's brightness varies with the seed
    # brightness x 2, nothing else: colours double (clipped), channel ratios kept
    flat = replace(cfg, photo_gain_range=(1.0, 1.0), photo_brightness_range=(2.0, 2.0),
                   photo_contrast_range=(1.0, 1.0), photo_saturation_range=(1.0, 1.0), photo_gray_prob=0.0,
                   photo_noise_std=0.0)
    d = A.random_photometric(copy.deepcopy(d0), flat, np.random.default_rng(0))
    np.testing.assert_allclose(d["points"][ps, 4:7], np.minimum(d0["points"][ps, 4:7] * 2.0, 85.0), atol=1e-9)
    # grey image: the three channels equal
    grey = replace(flat, photo_brightness_range=(1.0, 1.0), photo_gray_prob=1.0)
    g = A.random_photometric(copy.deepcopy(d0), grey, np.random.default_rng(0))["points"][ps, 4:7]
    np.testing.assert_allclose(g, g[:, :1].repeat(3, 1), atol=1e-9)
    # wired into the chain: the frame's own pseudo points (id >= 0) keep their colours with it off, not with it on
    for on in (False, True):
        aug = A.Augmentor(replace(ds.augmentor.cfg, photometric=on), ds.augmentor.db)
        out = aug(_fresh(samples, 0), np.random.default_rng(5))["points"]
        own = (out[:, 8] >= 0) & (out[:, 7] == 1)
        moved = np.abs(out[own, 4:7] - d0["points"][out[own, 8].astype(int), 4:7]).max()
        assert (moved > 0.5) if on else (moved == 0.0)


def test_photometric_config_validation():
    from cmfiou_core.config import ConfigError

    cfg = A.AugmentConfig.from_dict({"photometric": True, "photo_brightness_range": [0.5, 1.5]})
    assert cfg.photometric and cfg.photo_brightness_range == (0.5, 1.5)
    with pytest.raises(ConfigError, match="photo_gain_range"):
        A.AugmentConfig.from_dict({"photo_gain_range": [1.2, 0.8]})
    with pytest.raises(ConfigError, match="photo_gray_prob"):
        A.AugmentConfig.from_dict({"photo_gray_prob": 1.5})
