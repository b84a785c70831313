"""KITTI object dataset in the OpenPCDet / CMF-IOU layout without pickle.

Layout under ``root``: ``training/{calib,label_2,image_2,velodyne,velodyne_depth,planes}``, ``testing/...``,
``ImageSets/{train,val,test}.txt``. Generated files (JSON instead of the official pickles):
``kitti_infos_<split>.json``, ``kitti_dbinfos_train_mm.json`` + ``gt_database_mm/<id>_<cls>_<k>.npy``.

Infos follow OpenPCDet ``get_infos``: ``point_cloud`` {num_features, lidar_idx}, ``image`` {image_idx,
image_shape (H, W)}, ``calib`` {P2, R0_rect, Tr_velo_to_cam}, ``annos`` (see :mod:`labels`) with ``gt_boxes_lidar``
(non-DontCare objects, centre z = bottom + h/2, heading = -(pi/2 + ry)) and ``num_points_in_gt`` (raw .bin points
inside the FOV; -1 for DontCare).

``KittiDataset.__getitem__``: 8-col combined cloud (``velodyne_depth/<id>.npy`` via ``depth.read_velodyne_depth``,
or generated on the fly with ``depth.PseudoPointGenerator`` and cached) -> FOV filter -> augmentation (training) ->
class filter (Van -> Car when ``use_van``, training only) -> range masking -> shuffle (training) -> empty training
frames are redrawn -> split by flag -> pseudo subsampling (training: random 20 %; test: ``input_point_discard``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..calib import Calibration
from ..geometry.boxes import boxes3d_kitti_camera_to_lidar, boxes_to_corners_3d
from ..geometry.points_in_boxes import points_in_boxes_mask
from .augment import Augmentor, GTDatabase
from .dataset_config import DatasetConfig  # noqa: F401  (the ``data:`` section; re-exported here)
from .labels import objects_to_annos, read_label_file

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """Missing or inconsistent dataset files (the message names the path)."""


# ----------------------------------------------------------------------------------------------- file access
def read_velodyne_bin(path: Union[str, Path]) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"velodyne file not found: {path}")
    raw = np.fromfile(path, dtype=np.float32)
    if raw.size % 4:
        raise DatasetError(f"{path}: size {raw.size * 4} bytes is not a multiple of 16 (float32 x, y, z, i)")
    return raw.reshape(-1, 4)


def read_image(path: Union[str, Path]) -> np.ndarray:
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"image not found: {path}")
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def image_size(path: Union[str, Path]) -> Tuple[int, int]:
    """(H, W) without decoding the pixels."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"image not found: {path}")
    with Image.open(path) as im:
        return int(im.size[1]), int(im.size[0])


def read_road_plane(path: Union[str, Path]) -> Optional[np.ndarray]:
    """KITTI ``planes/<id>.txt`` (4th line a b c d in the rect frame), normalised so |(a, b, c)| = 1 and b < 0."""
    path = Path(path)
    if not path.is_file():
        return None
    lines = path.read_text().splitlines()
    if len(lines) < 4:
        raise DatasetError(f"{path}: expected the plane on line 4")
    plane = np.array([float(v) for v in lines[3].split()], dtype=np.float64)
    if plane.size != 4 or not np.all(np.isfinite(plane)):
        raise DatasetError(f"{path}: line 4 must hold 4 numbers a b c d")
    if plane[1] > 0:
        plane = -plane
    return plane / np.linalg.norm(plane[:3])


def fov_flag(points: np.ndarray, calib: Calibration, image_shape: Sequence[int]) -> np.ndarray:
    """OpenPCDet ``get_fov_flag``: projects inside [0, W) x [0, H) and rect depth >= 0."""
    if points.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    rect = calib.lidar_to_rect(points[:, :3].astype(np.float64))
    uv, depth = calib.rect_to_img(rect)
    H, W = int(image_shape[0]), int(image_shape[1])
    return (uv[:, 0] >= 0) & (uv[:, 0] < W) & (uv[:, 1] >= 0) & (uv[:, 1] < H) & (rect[:, 2] >= 0)


def read_split(root: Union[str, Path], split: str) -> List[str]:
    p = Path(root) / "ImageSets" / f"{split}.txt"
    if not p.is_file():
        raise DatasetError(f"split file not found: {p}")
    return [x.strip() for x in p.read_text().split() if x.strip()]


# ----------------------------------------------------------------------------------------------- infos
def _to_json(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, dict):
        return {k: _to_json(v) for k, v in o.items()}
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return o


_ANNO_DTYPES = {"name": "<U16", "truncated": np.float64, "occluded": np.int64, "alpha": np.float64,
                "bbox": np.float64, "dimensions": np.float64, "location": np.float64, "rotation_y": np.float64,
                "score": np.float64, "difficulty": np.int64, "index": np.int64, "gt_boxes_lidar": np.float64,
                "num_points_in_gt": np.int64}
_ANNO_SHAPES = {"bbox": (-1, 4), "dimensions": (-1, 3), "location": (-1, 3), "gt_boxes_lidar": (-1, 7)}


def _from_json_info(info: dict) -> dict:
    info["image"]["image_shape"] = np.array(info["image"]["image_shape"], dtype=np.int64)
    for k in ("P2", "R0_rect", "Tr_velo_to_cam"):
        info["calib"][k] = np.array(info["calib"][k], dtype=np.float64)
    if "annos" in info:
        a = info["annos"]
        for k, v in a.items():
            arr = np.array(v, dtype=_ANNO_DTYPES.get(k, None))
            if k in _ANNO_SHAPES:
                arr = arr.reshape(_ANNO_SHAPES[k])
            a[k] = arr
    return info


def calib_from_info(info: dict) -> Calibration:
    H, W = (int(v) for v in info["image"]["image_shape"])
    c = info["calib"]
    return Calibration(np.asarray(c["P2"])[:3, :4], np.asarray(c["R0_rect"])[:3, :3],
                       np.asarray(c["Tr_velo_to_cam"])[:3, :4], W, H)


def annos_boxes_lidar(annos: dict, calib: Calibration) -> np.ndarray:
    """gt_boxes_lidar of the non-DontCare objects (OpenPCDet: camera box [loc, l, h, w, ry] -> LiDAR, z + h/2)."""
    n = int(np.sum(annos["name"] != "DontCare"))
    loc, dims, rots = annos["location"][:n], annos["dimensions"][:n], annos["rotation_y"][:n]
    cam = np.concatenate([loc, dims, rots[:, None]], axis=1).reshape(-1, 7)  # dims are (l, h, w)
    if n == 0:
        return np.zeros((0, 7))
    return boxes3d_kitti_camera_to_lidar(cam.astype(np.float64), calib)


def frame_info(root: Union[str, Path], frame_id: str, split_dir: str = "training", has_label: bool = True,
               count_points: bool = True) -> dict:
    base = Path(root) / split_dir
    H, W = image_size(base / "image_2" / f"{frame_id}.png")
    calib = Calibration.from_kitti_object_file(base / "calib" / f"{frame_id}.txt", W, H)
    info = {"point_cloud": {"num_features": 4, "lidar_idx": frame_id},
            "image": {"image_idx": frame_id, "image_shape": np.array([H, W], dtype=np.int64)},
            "calib": {"P2": calib.P2, "R0_rect": calib.R0_rect, "Tr_velo_to_cam": calib.Tr_velo_to_cam}}
    if has_label:
        objs = read_label_file(base / "label_2" / f"{frame_id}.txt")
        dc = [o for o in objs if o["name"] == "DontCare"]
        objs = [o for o in objs if o["name"] != "DontCare"] + dc  # OpenPCDet assumes DontCare last
        annos = objects_to_annos(objs)
        boxes = annos_boxes_lidar(annos, calib)
        annos["gt_boxes_lidar"] = boxes
        n_all, n_obj = len(objs), boxes.shape[0]
        num = -np.ones(n_all, dtype=np.int64)
        if count_points:
            pts = read_velodyne_bin(base / "velodyne" / f"{frame_id}.bin")
            pts = pts[fov_flag(pts, calib, (H, W))]
            num[:n_obj] = points_in_boxes_mask(pts, boxes).sum(0)
        annos["num_points_in_gt"] = num
        info["annos"] = annos
    return info


def create_infos(root: Union[str, Path], split: str, out: Optional[Union[str, Path]] = None) -> List[dict]:
    """Infos for ``ImageSets/<split>.txt`` (``test`` reads ``testing/`` without labels); written as JSON when
    ``out`` is given (default name ``kitti_infos_<split>.json`` under root when out == 'default')."""
    root = Path(root)
    is_test = split == "test"
    ids = read_split(root, split)
    infos = [frame_info(root, i, "testing" if is_test else "training", has_label=not is_test) for i in ids]
    if out is not None:
        out = root / f"kitti_infos_{split}.json" if out == "default" else Path(out)
        save_infos(out, infos)
    return infos


def save_infos(path: Union[str, Path], infos: List[dict]) -> Path:
    path = Path(path)
    path.write_text(json.dumps({"format": "cmfiou-kitti-infos-v1", "infos": [_to_json(i) for i in infos]}))
    return path


def load_infos(path: Union[str, Path]) -> List[dict]:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"infos file not found: {path} (create it with python -m cmfiou_core.tools.create_infos)")
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or data.get("format") != "cmfiou-kitti-infos-v1":
        raise DatasetError(f"{path}: not a cmfiou infos file (format cmfiou-kitti-infos-v1)")
    return [_from_json_info(i) for i in data["infos"]]


# ----------------------------------------------------------------------------------------------- points
_GENERATOR = None


def _pseudo_generator():
    global _GENERATOR
    if _GENERATOR is None:
        from ..depth.config import DepthConfig
        from ..depth.pseudo import PseudoPointGenerator

        _GENERATOR = PseudoPointGenerator(DepthConfig())
    return _GENERATOR


def raw_rows_from_bin(path: Union[str, Path], pts: Optional[np.ndarray] = None) -> np.ndarray:
    """(N, 8) float32 raw LiDAR rows ``[x, y, z, 10 i, 0, 0, 0, 2]`` of every point of a velodyne ``.bin`` (``pts``:
    that file's points when already read), built by ``depth.pseudo.raw_rows_from_points`` as at inference."""
    from ..depth.pseudo import raw_rows_from_points

    pts = read_velodyne_bin(path) if pts is None else pts
    return raw_rows_from_points(torch.from_numpy(pts)).numpy()


def load_points_mm(root: Union[str, Path], frame_id: str, split_dir: str = "training", cache: bool = True,
                   generator=None, calib: Optional[Calibration] = None, raw_from_bin: bool = False) -> np.ndarray:
    """(N, 8) float32 combined cloud: ``velodyne_depth/<id>.npy`` when present (``read_velodyne_depth``), else generated
    from the .bin + image with ``PseudoPointGenerator`` (ipbasic unless another generator is given) and cached.

    ``raw_from_bin``: take the raw LiDAR rows from ``velodyne/<id>.bin`` (float32, what the deployed pipeline sees)
    instead of the ``velodyne_depth`` file, which stores them as float16 (official format: 1.5-3 cm steps at 16-64 m).
    All of the file's points are taken: the dataset's FOV filter applies afterwards, as to the file's rows.
    """
    from ..depth.io import read_velodyne_depth, write_velodyne_depth

    base = Path(root) / split_dir
    bin_path = base / "velodyne" / f"{frame_id}.bin"
    p = base / "velodyne_depth" / f"{frame_id}.npy"
    pts = None
    if p.is_file():
        rows = read_velodyne_depth(p)
    else:
        pts = read_velodyne_bin(bin_path)
        img = np.array(read_image(base / "image_2" / f"{frame_id}.png"))
        if calib is None:
            calib = Calibration.from_kitti_object_file(base / "calib" / f"{frame_id}.txt", img.shape[1], img.shape[0])
        gen = generator if generator is not None else _pseudo_generator()
        with torch.no_grad():
            res = gen(torch.from_numpy(pts), torch.from_numpy(np.ascontiguousarray(img)), calib)
        rows = res.all_rows.cpu().numpy()
        if cache:
            try:
                p.parent.mkdir(parents=True, exist_ok=True)
                tmp = p.with_suffix(".tmp.npy")
                write_velodyne_depth(tmp, rows)
                tmp.replace(p)
                rows = read_velodyne_depth(p)  # exactly what later reads see (float16)
            except OSError as e:  # read-only datasets still work
                log.warning("could not cache pseudo points at %s: %s", p, e)
    rows = rows.astype(np.float32)
    if raw_from_bin:
        rows = np.concatenate([raw_rows_from_bin(bin_path, pts), rows[rows[:, 7] != 2]], 0)
    return rows


# ----------------------------------------------------------------------------------------------- dataset
class KittiDataset:
    """``KittiDataset(root, split, training)``; items are dicts (see module doc), batched by ``collate_batch``."""

    def __init__(self, root: Union[str, Path], split: str = "train", training: bool = True,
                 cfg: DatasetConfig = DatasetConfig(), infos: Optional[List[dict]] = None, seed: int = 0,
                 pseudo_generator=None, augment: bool = True):
        self.root = Path(root)
        self.split = split
        self.training = training
        self.cfg = cfg
        self.seed = int(seed)
        self.epoch = 0
        self.split_dir = "testing" if split == "test" else "training"
        self._gen = pseudo_generator
        if infos is None:
            f = self.root / f"kitti_infos_{split}.json"
            infos = load_infos(f) if f.is_file() else create_infos(self.root, split)
        self.infos = infos
        self.augmentor = None
        if training and augment:
            db = None
            idx = self.root / cfg.db_index
            if idx.is_file():
                db = GTDatabase(self.root, idx)
                want = "bin" if cfg.raw_points_from_bin else "velodyne_depth"
                if cfg.use_pseudo and db.raw_rows_from in ("bin", "velodyne_depth") and db.raw_rows_from != want:
                    log.warning("GT database %s holds raw rows from %s but data.raw_points_from_bin is %s: pasted "
                                "objects and scenes differ in precision; rebuild it with create_infos%s", idx,
                                db.raw_rows_from, cfg.raw_points_from_bin,
                                " --raw-from-bin" if cfg.raw_points_from_bin else " (without --raw-from-bin)")
            else:
                log.warning("no GT database at %s: gt_sampling/da_sampling disabled", idx)
            self.augmentor = Augmentor(cfg.augment, db)

    def __len__(self) -> int:
        return len(self.infos)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def get_points_mm(self, info: dict, calib: Calibration) -> np.ndarray:
        fid = info["point_cloud"]["lidar_idx"]
        if not self.cfg.use_pseudo:
            return raw_rows_from_bin(self.root / self.split_dir / "velodyne" / f"{fid}.bin")
        return load_points_mm(self.root, fid, self.split_dir, self.cfg.cache_pseudo, self._gen, calib,
                              raw_from_bin=self.cfg.raw_points_from_bin)

    def load_sample(self, index: int) -> dict:
        """Un-augmented sample: FOV-filtered 8-col cloud and all non-DontCare GT of the frame."""
        info = self.infos[index]
        calib = calib_from_info(info)
        shape = np.asarray(info["image"]["image_shape"], dtype=np.int64)
        pts = self.get_points_mm(info, calib)
        if self.cfg.fov_points_only:
            pts = pts[fov_flag(pts, calib, shape)]
        d = {"points": pts, "calib": calib, "image_shape": shape, "frame_id": info["point_cloud"]["lidar_idx"]}
        if "annos" in info:
            a = info["annos"]
            n = a["gt_boxes_lidar"].shape[0]
            d["gt_names"] = a["name"][:n].copy()
            d["gt_boxes"] = a["gt_boxes_lidar"].astype(np.float64).copy()
            plane = read_road_plane(self.root / self.split_dir / "planes" / f"{d['frame_id']}.txt")
            if plane is not None:
                d["road_plane"] = plane
        return d

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        for _attempt in range(self.cfg.max_redraw + 1):
            out = self._prepare(self.load_sample(index), rng)
            if out is not None:
                return out
            index = int(rng.integers(len(self)))
        raise DatasetError(f"no frame with ground truth found after {self.cfg.max_redraw} redraws")

    def _prepare(self, d: dict, rng: np.random.Generator) -> Optional[dict]:
        cfg = self.cfg
        names = d.pop("gt_names", np.zeros(0, dtype="<U16"))
        boxes = d.pop("gt_boxes", np.zeros((0, 7)))
        if self.training and cfg.use_van:
            names = np.where(names == "Van", "Car", names)
        d["gt_names"], d["gt_boxes"] = names, boxes
        d["aug_param"] = np.array([0.0, 0.0, 1.0])
        if self.training and self.augmentor is not None:
            d = self.augmentor(d, rng)
        keep = np.isin(d["gt_names"], cfg.class_names)
        boxes, names = d["gt_boxes"][keep], d["gt_names"][keep]
        pts = np.asarray(d["points"])
        r = np.asarray(cfg.point_cloud_range)
        inr = (pts[:, 0] >= r[0]) & (pts[:, 0] <= r[3]) & (pts[:, 1] >= r[1]) & (pts[:, 1] <= r[4])
        pts = pts[inr]
        if cfg.remove_outside_boxes and boxes.shape[0]:
            corners = boxes_to_corners_3d(boxes[:, :7].astype(np.float64))
            m = ((corners >= r[:3]) & (corners <= r[3:])).all(axis=2).sum(axis=1) >= 1
            boxes, names = boxes[m], names[m]
        if self.training and boxes.shape[0] == 0:
            return None
        if self.training and cfg.shuffle_points:
            pts = pts[rng.permutation(pts.shape[0])]
        raw = pts[pts[:, 7] == 2]
        ps = pts[pts[:, 7] == 1]
        if not cfg.use_pseudo:
            ps = ps[:0]
        elif self.training:
            n = ps.shape[0]
            perm = rng.permutation(n)
            ps = ps[perm[int(n * (1.0 - cfg.pseudo_train_keep)):]]
            if cfg.pseudo_frame_drop > 0 and rng.random() < cfg.pseudo_frame_drop:
                ps = ps[:0]            # modality dropout: this frame trains LiDAR-only
        elif ps.shape[0]:
            from ..depth.config import DiscardConfig
            from ..depth.io import input_point_discard

            g = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
            rate = DiscardConfig.rate if cfg.discard_rate is None else cfg.discard_rate
            ps = input_point_discard(torch.from_numpy(np.ascontiguousarray(ps, dtype=np.float32)), rate,
                                     cfg.discard_bin_num, cfg.discard_max_dis, generator=g).numpy()
        cls_id = np.array([cfg.class_names.index(n) + 1 for n in names], dtype=np.float32)
        gt = np.concatenate([boxes[:, :7].astype(np.float32), cls_id[:, None]], 1) if boxes.shape[0] else \
            np.zeros((0, 8), np.float32)
        out = {"points": np.ascontiguousarray(raw, dtype=np.float32),
               "points_mm": np.ascontiguousarray(ps, dtype=np.float32),
               "gt_boxes": gt, "gt_names": names, "aug_param": d["aug_param"].astype(np.float32),
               "calib": d["calib"], "image_shape": d["image_shape"], "frame_id": d["frame_id"]}
        if "local_trans" in d:
            out["local_trans"] = np.asarray(d["local_trans"], dtype=np.float32)
        return out


# ----------------------------------------------------------------------------------------------- builders
from .collate import collate_batch as collate  # noqa: E402  (the trainer looks up ``kitti.collate``)


def build_train_dataset(root: Union[str, Path], data_cfg: Optional[dict] = None, split: str = "train",
                        training: bool = True, use_pseudo: bool = True, seed: int = 0) -> KittiDataset:
    """Dataset from the YAML ``data:`` section (:meth:`DatasetConfig.from_dict`; ``optimization`` removed by the
    caller). Creates ``kitti_infos_<split>.json`` when missing (the GT database must be built beforehand with
    ``python -m cmfiou_core.tools.create_infos``; without it gt_sampling is skipped with a warning)."""
    cfg = DatasetConfig.from_dict(data_cfg, path="data")
    if not use_pseudo:
        cfg = DatasetConfig(**{**cfg.__dict__, "use_pseudo": False})
    return KittiDataset(root, split, training=training, cfg=cfg, seed=seed)


def make_eval_fn(cfg, root, split: str = "val", use_pseudo: bool = True):
    """Training-engine evaluation hook (``cmfiou-train --eval-every``): KITTI AP of the deployed inference path on
    ``split`` (see :func:`cmfiou_core.eval.dataset_eval.make_eval_fn`)."""
    from ..eval.dataset_eval import make_eval_fn as _make

    return _make(cfg, root, split, use_pseudo)
