"""KITTI dataset: label I/O, infos, GT database, __getitem__ and collate on real KITTI frames (kitti_samples)."""
import json

import numpy as np
import pytest
import torch

from cmfiou_core.data.collate import collate_batch
from cmfiou_core.data.gt_database import create_gt_database
from cmfiou_core.data.kitti import DatasetConfig, KittiDataset, calib_from_info, create_infos, fov_flag, \
    load_infos, load_points_mm, read_velodyne_bin, save_infos
from cmfiou_core.data.labels import LabelError, annos_to_text, objects_to_annos, parse_label_line, read_label_file
from cmfiou_core.geometry.boxes import boxes3d_kitti_camera_to_lidar
from cmfiou_core.geometry.points_in_boxes import points_in_boxes_mask

TRAIN = ["000001", "000007", "000021"]
VAL = ["000114"]


@pytest.fixture(scope="session")
def kitti_root(kitti_samples, tmp_path_factory):
    """A writable KITTI root of symlinks to a few real frames (+ infos, pseudo-point cache, GT database)."""
    src = kitti_samples / "object" / "training"
    root = tmp_path_factory.mktemp("kitti")
    for sub, ext in (("calib", "txt"), ("label_2", "txt"), ("image_2", "png"), ("velodyne", "bin")):
        (root / "training" / sub).mkdir(parents=True)
        for f in TRAIN + VAL:
            (root / "training" / sub / f"{f}.{ext}").symlink_to(src / sub / f"{f}.{ext}")
    (root / "ImageSets").mkdir()
    (root / "ImageSets" / "train.txt").write_text("\n".join(TRAIN) + "\n")
    (root / "ImageSets" / "val.txt").write_text("\n".join(VAL) + "\n")
    for s in ("train", "val"):
        create_infos(root, s, out="default")
    create_gt_database(root, load_infos(root / "kitti_infos_train.json"))
    return root


def test_label_roundtrip(kitti_samples):
    for f in sorted((kitti_samples / "object" / "training" / "label_2").glob("*.txt")):
        objs = read_label_file(f)
        dc = [o for o in objs if o["name"] == "DontCare"]
        objs = [o for o in objs if o["name"] != "DontCare"] + dc
        a = objects_to_annos(objs)
        text = annos_to_text(a)
        back = objects_to_annos([parse_label_line(l) for l in text.splitlines()])
        for k in ("name", "occluded", "difficulty", "index"):
            assert np.array_equal(a[k], back[k]), k
        for k in ("truncated", "alpha", "bbox", "dimensions", "location", "rotation_y"):
            np.testing.assert_allclose(a[k], back[k], atol=1e-9, err_msg=k)
        # the original files use the same 2-decimal format: text round-trips line by line
        orig = sorted(l.split() for l in f.read_text().splitlines() if l.strip())
        mine = sorted(l.split() for l in text.splitlines())
        assert [list(map(float, o[1:])) for o in orig] == [list(map(float, m[1:])) for m in mine]


@pytest.mark.parametrize("line,msg", [
    ("Car 0.00 0 -1.58 587.01 173.33 614.12 200.12 1.65 1.67 3.64 -0.65 1.71", "expected 15 fields"),
    ("Bus 0.00 0 -1.58 587.01 173.33 614.12 200.12 1.65 1.67 3.64 -0.65 1.71 46.70 -1.59", "unknown object type"),
    ("Car 0.00 0 -1.58 587.01 abc 614.12 200.12 1.65 1.67 3.64 -0.65 1.71 46.70 -1.59", "'y1' is not a number"),
    ("Car 0.00 7 -1.58 587.01 173.33 614.12 200.12 1.65 1.67 3.64 -0.65 1.71 46.70 -1.59", "occluded"),
    ("Car 1.50 0 -1.58 587.01 173.33 614.12 200.12 1.65 1.67 3.64 -0.65 1.71 46.70 -1.59", "truncated"),
    ("Car 0.00 0 -1.58 587.01 173.33 614.12 200.12 -1.65 1.67 3.64 -0.65 1.71 46.70 -1.59", "dimensions"),
    ("Car 0.00 0 -1.58 617.01 173.33 614.12 200.12 1.65 1.67 3.64 -0.65 1.71 46.70 -1.59", "x2 >= x1"),
])
def test_label_validation(line, msg):
    with pytest.raises(LabelError, match=msg):
        parse_label_line(line, "x.txt:3")


def test_label_valid_with_score():
    good = "Car 0.00 0 -1.58 587.01 173.33 614.12 200.12 1.65 1.67 3.64 -0.65 1.71 46.70 -1.59"
    o = parse_label_line(good)
    assert o["name"] == "Car" and o["dimensions_hwl"] == [1.65, 1.67, 3.64] and o["score"] == -1.0
    assert parse_label_line(good + " 0.9")["score"] == pytest.approx(0.9)
    dc = parse_label_line("DontCare -1 -1 -10 503.89 169.71 590.61 190.13 -1 -1 -1 -1000 -1000 -1000 -10")
    assert dc["name"] == "DontCare"


def test_infos(kitti_root):
    infos = load_infos(kitti_root / "kitti_infos_train.json")
    assert [i["point_cloud"]["lidar_idx"] for i in infos] == TRAIN
    for info in infos:
        fid = info["point_cloud"]["lidar_idx"]
        a = info["annos"]
        calib = calib_from_info(info)
        n = a["gt_boxes_lidar"].shape[0]
        assert n == int(np.sum(a["name"] != "DontCare")) and np.all(a["name"][n:] == "DontCare")
        cam = np.concatenate([a["location"][:n], a["dimensions"][:n], a["rotation_y"][:n, None]], 1)
        ref = boxes3d_kitti_camera_to_lidar(cam, calib)
        np.testing.assert_allclose(a["gt_boxes_lidar"], ref, atol=1e-9)
        # centre z = bottom + h/2; heading = -(pi/2 + ry)
        np.testing.assert_allclose(a["gt_boxes_lidar"][:, 6], -(np.pi / 2 + a["rotation_y"][:n]), atol=1e-9)
        pts = read_velodyne_bin(kitti_root / "training" / "velodyne" / f"{fid}.bin")
        pts = pts[fov_flag(pts, calib, info["image"]["image_shape"])]
        cnt = points_in_boxes_mask(torch.from_numpy(pts[:, :3].astype(np.float64)),
                                   torch.from_numpy(a["gt_boxes_lidar"])).sum(0).numpy()
        assert np.array_equal(a["num_points_in_gt"][:n], cnt)
        assert np.all(a["num_points_in_gt"][n:] == -1)
        assert np.all(cnt > 0)
    # JSON round trip
    p = kitti_root / "rt.json"
    save_infos(p, infos)
    back = load_infos(p)
    for x, y in zip(infos, back):
        for k, v in x["annos"].items():
            assert np.array_equal(v, y["annos"][k]), k
    assert b"pickle" not in p.read_bytes()


def test_gt_database(kitti_root):
    idx = json.loads((kitti_root / "kitti_dbinfos_train_mm.json").read_text())
    objs = [o for lst in idx["objects"].values() for o in lst]
    infos = {i["point_cloud"]["lidar_idx"]: i for i in load_infos(kitti_root / "kitti_infos_train.json")}
    assert {"Car", "Cyclist", "Van"} <= set(idx["objects"])
    for o in objs:
        pts = np.load(kitti_root / o["path"], allow_pickle=False)
        assert pts.dtype == np.float32 and pts.shape[1] == 8
        assert o["num_points_in_gt"] == int(np.sum(pts[:, 7] == 2))  # raw only
        assert o["num_points_all"] == pts.shape[0]
        box = np.array(o["box3d_lidar"])
        # box-centre relative: inside the box placed at the origin
        b0 = box.copy()
        b0[:3] = 0
        inside = points_in_boxes_mask(torch.from_numpy(pts[:, :3].astype(np.float64)),
                                      torch.from_numpy(b0[None])).numpy()[:, 0]
        assert inside.mean() > 0.999
        # raw count close to the infos count (the npy stores float16 coordinates)
        ref = infos[o["image_idx"]]["annos"]["num_points_in_gt"][o["gt_idx"]]
        assert abs(o["num_points_in_gt"] - ref) <= max(2, 0.03 * ref)
        assert np.all(np.isin(pts[:, 7], (1.0, 2.0)))
    # pseudo points were generated (PseudoPointGenerator) and cached as official float16 files
    assert (kitti_root / "training" / "velodyne_depth" / "000001.npy").is_file()
    assert any(np.sum(np.load(kitti_root / o["path"])[:, 7] == 1) > 0 for o in objs)


def test_getitem_train(kitti_root):
    ds = KittiDataset(kitti_root, "train", training=True, seed=3)
    assert ds.augmentor is not None and ds.augmentor.db is not None
    raw_all = load_points_mm(kitti_root, "000021")
    for i in range(len(ds)):
        it = ds[i]
        assert set(it) >= {"points", "points_mm", "gt_boxes", "aug_param", "calib", "image_shape", "frame_id"}
        assert it["points"].dtype == np.float32 and it["points"].shape[1] == 8
        assert np.all(it["points"][:, 7] == 2) and np.all(it["points_mm"][:, 7] == 1)
        assert it["gt_boxes"].shape[1] == 8 and np.all(np.isin(it["gt_boxes"][:, 7], (1, 2, 3)))
        assert np.all(it["gt_boxes"][:, 6] >= -np.pi) and np.all(it["gt_boxes"][:, 6] < np.pi)
        rot, flip, scale = it["aug_param"]
        assert abs(rot) <= np.pi / 4 and flip in (0, 1) and 0.95 <= scale <= 1.05
        assert tuple(it["image_shape"]) == (int(it["calib"].image_height), int(it["calib"].image_width))
    # determinism per (seed, epoch, index)
    a, b = ds[2], ds[2]
    assert np.array_equal(a["points"], b["points"]) and np.array_equal(a["gt_boxes"], b["gt_boxes"])
    ds.set_epoch(1)
    assert not np.array_equal(ds[2]["aug_param"], a["aug_param"])
    # pseudo subsampling: about 20 % of the FOV pseudo points survive (before pasting objects)
    ds_na = KittiDataset(kitti_root, "train", training=True, seed=3, augment=False)
    it = ds_na[2]
    info = ds_na.infos[2]
    calib = calib_from_info(info)
    fov = raw_all[fov_flag(raw_all, calib, info["image"]["image_shape"])]
    r = DatasetConfig().point_cloud_range
    inr = (fov[:, 0] >= r[0]) & (fov[:, 0] <= r[3]) & (fov[:, 1] >= r[1]) & (fov[:, 1] <= r[4])
    n_ps = int(np.sum(fov[inr, 7] == 1))
    assert it["points_mm"].shape[0] == n_ps - int(n_ps * 0.8)
    assert it["points"].shape[0] == int(np.sum(fov[inr, 7] == 2))
    # Van -> Car (USE_VAN) in training: 000021 has 6 Car + 1 Van + 1 Cyclist
    ids = it["gt_boxes"][:, 7]
    assert int(np.sum(ids == 1)) == 7 and int(np.sum(ids == 3)) == 1


def test_getitem_test_and_collate(kitti_root):
    ds = KittiDataset(kitti_root, "val", training=False, seed=0)
    assert ds.augmentor is None
    it = ds[0]
    assert np.array_equal(it["aug_param"], np.array([0, 0, 1], np.float32))
    # Van stays Van at test time -> not a detection class; 000114: 8 Car, 1 Cyclist, 1 Pedestrian (in range)
    assert int(np.sum(it["gt_boxes"][:, 7] == 1)) <= 8
    allp = load_points_mm(kitti_root, "000114")
    n_ps = int(np.sum(allp[:, 7] == 1))
    assert 0.1 * n_ps < it["points_mm"].shape[0] < 0.3 * n_ps  # input_point_discard keeps ~20 %
    tr = KittiDataset(kitti_root, "train", training=True)[0]
    b = collate_batch([it, tr])
    assert b["batch_size"] == 2 and len(b["points"]) == 2 and len(b["points_mm"]) == 2
    assert b["points"][1].shape == tr["points"].shape and b["points_mm"][0].shape[1] == 8
    assert b["gt_boxes_padded"].shape == (2, max(len(it["gt_boxes"]), len(tr["gt_boxes"])), 8)
    assert np.array_equal(b["gt_boxes"][1], tr["gt_boxes"])
    assert b["aug_param"].shape == (2, 3) and b["image_shape"].shape == (2, 2)


def test_build_train_dataset_from_yaml_section(kitti_root):
    from cmfiou_core.config import load_yaml
    from cmfiou_core.data import kitti

    from pathlib import Path

    cfg_file = Path(__file__).resolve().parents[1] / "config" / "cmfiou_kitti.yaml"
    data = {k: v for k, v in (load_yaml(cfg_file).get("data") or {}).items() if k != "optimization"}
    ds = kitti.build_train_dataset(kitti_root, data)
    assert ds.training and ds.cfg.use_van
    raw_only = kitti.build_train_dataset(kitti_root, data, use_pseudo=False)
    it = raw_only[0]
    assert it["points_mm"].shape[0] == 0 and it["points"].shape[0] > 1000
    assert kitti.collate([it])["batch_size"] == 1


def test_redraw_empty_frames(kitti_root):
    ds = KittiDataset(kitti_root, "train", training=True, seed=1)
    orig = ds.load_sample

    def no_gt(i):
        d = orig(i)
        if i == 0:
            d["gt_boxes"] = np.zeros((0, 7))
            d["gt_names"] = np.zeros(0, dtype="<U16")
        return d

    ds.load_sample = no_gt
    from cmfiou_core.data.augment import Augmentor, AugmentConfig

    ds.augmentor = Augmentor(AugmentConfig(), None)
    it = ds[0]
    assert it["frame_id"] != "000001" and it["gt_boxes"].shape[0] > 0


def test_dataset_config_validation():
    from cmfiou_core.config import ConfigError

    c = DatasetConfig.from_dict({"use_van": False, "augment": {"pyramid": False}, "pseudo_train_keep": 0.3})
    assert not c.use_van and not c.augment.pyramid and c.pseudo_train_keep == 0.3
    assert DatasetConfig.from_dict(None) == DatasetConfig()
    with pytest.raises(ConfigError, match="use_vann"):
        DatasetConfig.from_dict({"use_vann": True})
    with pytest.raises(ConfigError, match="class_names"):
        DatasetConfig.from_dict({"class_names": ["Truck"]})
    with pytest.raises(ConfigError, match="point_cloud_range"):
        DatasetConfig.from_dict({"point_cloud_range": [0, 0, 0, -1, 1, 1]})


def test_raw_points_from_bin(kitti_root, tmp_path):
    """``raw_points_from_bin``: the raw rows are the .bin's float32 points (what the deployed pipeline sees), not the
    float16 rows of velodyne_depth; the pseudo rows are the file's. Default (official): the file's rows."""
    fid = "000114"
    file_rows = load_points_mm(kitti_root, fid)
    rows = load_points_mm(kitti_root, fid, raw_from_bin=True)
    pts = read_velodyne_bin(kitti_root / "training" / "velodyne" / f"{fid}.bin")
    raw = rows[rows[:, 7] == 2]
    assert raw.dtype == np.float32 and np.array_equal(raw[:, :3], pts[:, :3])
    assert np.array_equal(raw[:, 3], pts[:, 3] * 10.0) and not raw[:, 4:7].any()
    assert np.array_equal(rows[rows[:, 7] == 1], file_rows[file_rows[:, 7] == 1])
    # the file's raw rows are the FOV points rounded to float16: same set after the dataset's FOV filter
    info = {i["point_cloud"]["lidar_idx"]: i for i in load_infos(kitti_root / "kitti_infos_val.json")}[fid]
    calib, shape = calib_from_info(info), info["image"]["image_shape"]
    fov = raw[fov_flag(raw, calib, shape)]
    file_raw = file_rows[file_rows[:, 7] == 2]
    assert abs(len(fov) - len(file_raw)) <= 0.001 * len(fov)
    assert np.abs(np.sort(fov[:, 0]) - np.sort(file_raw[:, 0])).max() < 0.04
    assert (fov[:, :3] != fov[:, :3].astype(np.float16)).any()  # the rounding the option removes
    # through the dataset config (YAML key data.raw_points_from_bin) and the GT database
    cfg = DatasetConfig.from_dict({"raw_points_from_bin": True})
    it = KittiDataset(kitti_root, "val", training=False, cfg=cfg)[0]
    assert np.isin(it["points"][:, 0], pts[:, 0]).all()
    idx = create_gt_database(kitti_root, load_infos(kitti_root / "kitti_infos_train.json"), db_dir="gt_bin",
                             index_name="db_bin.json", raw_from_bin=True)
    assert json.loads(idx.read_text())["raw_rows_from"] == "bin"
    objs = [o for lst in json.loads(idx.read_text())["objects"].values() for o in lst]
    ref = {i["point_cloud"]["lidar_idx"]: i for i in load_infos(kitti_root / "kitti_infos_train.json")}
    for o in objs:  # float32 points: the raw count equals the infos' exact count
        assert o["num_points_in_gt"] == ref[o["image_idx"]]["annos"]["num_points_in_gt"][o["gt_idx"]]


def test_gt_database_records_raw_source_and_dataset_warns_on_mismatch(kitti_root, caplog):
    import logging

    db = json.loads((kitti_root / "kitti_dbinfos_train_mm.json").read_text())
    assert db["raw_rows_from"] == "velodyne_depth"  # the fixture's database: default (official) rows
    with caplog.at_level(logging.WARNING, logger="cmfiou_core.data.kitti"):
        KittiDataset(kitti_root, "train", training=True, cfg=DatasetConfig(raw_points_from_bin=False))
    assert "GT database" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="cmfiou_core.data.kitti"):
        KittiDataset(kitti_root, "train", training=True, cfg=DatasetConfig(raw_points_from_bin=True))
    assert "rebuild it with create_infos --raw-from-bin" in caplog.text


def test_pseudo_frame_drop(kitti_root):
    """data.pseudo_frame_drop: that share of training frames gets no pseudo points (raw rows and boxes as without
    it); 0 leaves every frame's sample bit-identical (no extra random draw)."""
    from dataclasses import replace

    base = KittiDataset(kitti_root, "train", training=True, seed=3, augment=False)
    same = KittiDataset(kitti_root, "train", training=True, seed=3, augment=False,
                        cfg=replace(DatasetConfig(), pseudo_frame_drop=0.0))
    drop = KittiDataset(kitti_root, "train", training=True, seed=3, augment=False,
                        cfg=replace(DatasetConfig(), pseudo_frame_drop=1.0))
    for i in range(len(base)):
        a, b, c = base[i], same[i], drop[i]
        assert a["points_mm"].shape[0] > 100
        for k in ("points", "points_mm", "gt_boxes"):
            assert np.array_equal(a[k], b[k])
        assert c["points_mm"].shape == (0, 8)
        assert np.array_equal(a["points"], c["points"]) and np.array_equal(a["gt_boxes"], c["gt_boxes"])
    half = KittiDataset(kitti_root, "train", training=True, seed=3, augment=False,
                        cfg=replace(DatasetConfig(), pseudo_frame_drop=0.5))
    empty = []
    for epoch in range(8):
        half.set_epoch(epoch)
        empty += [half[i]["points_mm"].shape[0] == 0 for i in range(len(half))]
    assert 0.2 < np.mean(empty) < 0.8
    from cmfiou_core.config import ConfigError

    with pytest.raises(ConfigError, match="pseudo_frame_drop"):
        DatasetConfig.from_dict({"pseudo_frame_drop": 1.5})
