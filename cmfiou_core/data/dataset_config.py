"""``DatasetConfig``: the typed ``data:`` section (less ``data.optimization``) of a config YAML, parsed at load by
``model.model_config.load_config`` and read by the KITTI dataset and the pipeline (``input_discard_rate``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

from ..config import ConfigError, Section
from ..types import CLASS_NAMES
from .augment import AugmentConfig


@dataclass
class DatasetConfig:
    class_names: Tuple[str, ...] = CLASS_NAMES
    use_van: bool = True
    point_cloud_range: Tuple[float, ...] = (0.0, -40.0, -3.0, 70.4, 40.0, 1.0)
    fov_points_only: bool = True
    remove_outside_boxes: bool = True
    shuffle_points: bool = True
    pseudo_train_keep: float = 0.2  # training: keep a random 20 % of the pseudo points
    # training: the share of frames that get no pseudo points at all (modality dropout: the camera withheld, so the
    # LiDAR branch must carry the detection alone); 0 (default) draws nothing
    pseudo_frame_drop: float = 0.0
    discard_rate: Optional[float] = None  # test: input_point_discard rate (None: depth.discard.rate, 0.8)
    discard_bin_num: int = 10
    discard_max_dis: float = 60.0
    cache_pseudo: bool = True
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    db_index: str = "kitti_dbinfos_train_mm.json"
    max_redraw: int = 50
    use_pseudo: bool = True  # False: raw LiDAR only (velodyne .bin, no depth completion); points_mm empty
    raw_points_from_bin: bool = False  # True: raw rows from the float32 .bin, not the float16 velodyne_depth file

    @classmethod
    def from_dict(cls, data: Optional[dict], source: str = "<config>", path: str = "dataset") -> "DatasetConfig":
        """Validated construction from a YAML mapping (keys = field names; ``augment`` = AugmentConfig keys)."""
        sec = Section(data, path, source)
        d = cls()
        names = sec.raw("class_names", list(d.class_names))
        if not isinstance(names, (list, tuple)) or not names or not all(n in CLASS_NAMES for n in names):
            raise ConfigError(f"{source}: '{path}.class_names' must be a non-empty list out of {list(CLASS_NAMES)}")
        rng = sec.floats("point_cloud_range", list(d.point_cloud_range), length=6)
        if not all(rng[i] < rng[i + 3] for i in range(3)):
            raise ConfigError(f"{source}: '{path}.point_cloud_range' must be [xmin, ymin, zmin, xmax, ymax, zmax]")
        aug = AugmentConfig.from_dict(sec.raw("augment", None), source, f"{path}.augment")
        out = cls(class_names=tuple(names), use_van=sec.bool("use_van", d.use_van), point_cloud_range=tuple(rng),
                  fov_points_only=sec.bool("fov_points_only", d.fov_points_only),
                  remove_outside_boxes=sec.bool("remove_outside_boxes", d.remove_outside_boxes),
                  shuffle_points=sec.bool("shuffle_points", d.shuffle_points),
                  pseudo_train_keep=sec.float("pseudo_train_keep", d.pseudo_train_keep, min=0.0, max=1.0),
                  pseudo_frame_drop=sec.float("pseudo_frame_drop", d.pseudo_frame_drop, min=0.0, max=1.0),
                  discard_rate=sec.float("input_discard_rate", min=0.0, max=1.0) if sec.has("input_discard_rate")
                  else None,
                  discard_bin_num=sec.int("discard_bin_num", d.discard_bin_num, min=1),
                  discard_max_dis=sec.float("discard_max_dis", d.discard_max_dis, min=0.0),
                  cache_pseudo=sec.bool("cache_pseudo", d.cache_pseudo), augment=aug,
                  db_index=sec.str("db_index", d.db_index), max_redraw=sec.int("max_redraw", d.max_redraw, min=0),
                  use_pseudo=sec.bool("use_pseudo", d.use_pseudo),
                  raw_points_from_bin=sec.bool("raw_points_from_bin", d.raw_points_from_bin))
        sec.finish()
        return out
