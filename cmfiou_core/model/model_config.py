"""Typed, validated model configuration (the ``model:`` section of ``config/cmfiou_kitti*.yaml``).

Every key is validated with :class:`cmfiou_core.config.Section`; unknown keys are errors. Two top-level sections are
passed through untouched: ``depth:`` (owned by the depth module, validated there) and ``data:`` (dataset / training
options, validated by their consumers). ``model.roi_head`` is handed to the RoI head as a mapping (its keys are
validated by ``cmfiou_core.model.roi_head.RoIHeadConfig.from_mapping``, including the proposal NMS ``nms_train`` /
``nms_test``); only ``roi_head.iou_branch.enabled`` is read here as well.

Layout (see ``config/cmfiou_kitti_official.yaml`` for the official values)::

    model:
      class_names: [Car, Pedestrian, Cyclist]
      point_cloud_range: [0, -40, -3, 70.4, 40, 1]
      voxel_size: [0.05, 0.05, 0.05]
      max_points_per_voxel: 5
      max_voxels: {train: 16000, test: 40000}     # per modality (raw and pseudo capped separately)
      vfe: {flag_reduce: max}                      # raw voxels: flag column = max (official MeanVFE MODEL: max)
      backbone_3d: {...}  bev: {...}  rpn: {...}
      roi_head: {...}   post_processing: {...}   test_views: {...}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from ..config import ConfigError, Section, load_yaml

CLASS_NAMES_ALLOWED = ("Car", "Pedestrian", "Cyclist")


@dataclass(frozen=True)
class Backbone3DConfig:
    num_filters: Tuple[int, int, int, int] = (64, 64, 64, 64)
    out_features: int = 64
    sd_branch: bool = True          # RAWSDBlock encoder-decoder in conv2..4 (False: plain 2x SubM blocks)
    mm: bool = True                 # pseudo (ResVC) branch present
    resvc_branch: bool = True       # ResConvBlock residual layer
    down_kernel_size: Tuple[int, ...] = (3, 3, 3)
    down_stride: Tuple[int, ...] = (1, 2, 2)
    down_filters: Tuple[int, ...] = (2, 1, 1)
    layer_discard_rate: float = 0.0  # official 0.15 is a no-op under spconv 2 (drops no sites); >0: real discard
    # eval-mode raw-branch batching: "wide" = official test trick (views side by side in a 4x-wide x shape, strict
    # 0 < x < W cut per view); "separate" = each view in its own tensor (no x==0 cut, no cross-view boundary leak)
    view_batching: str = "wide"
    # several voxels projecting onto one image-plane cell (u', v') of the ResVC 2D SubM convs:
    # "official" = hand spconv the duplicate sites (its hash table picks one row per site; spconv's GPU backward is
    # then not the adjoint of the forward, see resvc.py); "mean" = scatter-mean the duplicates onto unique sites,
    # convolve, gather back (well-defined on every backend; ours)
    image_plane_duplicates: str = "official"


@dataclass(frozen=True)
class BEVConfig:
    layer_nums: Tuple[int, ...] = (4, 4)
    layer_strides: Tuple[int, ...] = (1, 2)
    num_filters: Tuple[int, ...] = (64, 128)
    upsample_strides: Tuple[int, ...] = (1, 2)
    num_upsample_filters: Tuple[int, ...] = (128, 128)


@dataclass(frozen=True)
class AnchorClassConfig:
    class_name: str
    size: Tuple[float, float, float]
    rotations: Tuple[float, ...]
    bottom: float
    matched_threshold: float
    unmatched_threshold: float
    feature_map_stride: int = 8


@dataclass(frozen=True)
class RPNLossConfig:
    cls_weight: float = 1.0
    loc_weight: float = 2.0
    dir_weight: float = 0.2
    code_weights: Tuple[float, ...] = (1.0,) * 7
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    smooth_l1_beta: float = 1.0 / 9.0


@dataclass(frozen=True)
class RPNConfig:
    anchors: Tuple[AnchorClassConfig, ...]
    dir_offset: float = 0.78539
    dir_limit_offset: float = 0.0
    num_dir_bins: int = 2
    anchor_mask: bool = True         # VirConv anchor-mask quirk (anchors outside the raw voxels' BEV footprint masked)
    pos_fraction: Optional[float] = None   # None: no subsampling of anchors (official POS_FRACTION -1)
    sample_size: int = 512
    norm_by_num_examples: bool = False
    match_height: bool = False
    loss: RPNLossConfig = RPNLossConfig()


@dataclass(frozen=True)
class PostProcessConfig:
    score_mode: str = "cls"                     # cls | rectified | add
    rectifier_alpha: Tuple[float, ...] = (0.68, 0.71, 0.65)
    score_thresh: float = 0.4
    nms_type: str = "class_agnostic"            # class_agnostic | per_class
    nms_thresh: Tuple[float, ...] = (0.1,)      # one value, or one per class for per_class
    nms_pre_maxsize: Tuple[int, ...] = (4096,)
    nms_post_maxsize: Tuple[int, ...] = (500,)


@dataclass(frozen=True)
class TestViewsConfig:
    rotation: Tuple[float, ...] = (0.0,)
    flip: Tuple[int, ...] = (0,)
    scale: Tuple[float, ...] = (1.0,)

    @property
    def num(self) -> int:
        return len(self.rotation)

    def params(self) -> List[List[float]]:
        """(V, 3) [rot, flip, scale] rows, the ``transform_param`` of one frame."""
        return [[float(r), float(f), float(s)] for r, f, s in zip(self.rotation, self.flip, self.scale)]


OFFICIAL_X_TRANS = TestViewsConfig((0.3, 0.3, 0.0), (0, 1, 1), (0.98, 1.02, 1.0))


@dataclass(frozen=True)
class ModelConfig:
    class_names: Tuple[str, ...]
    point_cloud_range: Tuple[float, ...]
    voxel_size: Tuple[float, float, float]
    max_points_per_voxel: int
    max_voxels_train: int
    max_voxels_test: int
    vfe_flag_reduce: str
    backbone_3d: Backbone3DConfig
    bev: BEVConfig
    rpn: RPNConfig
    # the ``model.roi_head`` mapping (with ``_source``), validated by ``roi_head.RoIHeadConfig.from_mapping``; it also
    # holds the proposal-layer NMS settings (``nms_train`` / ``nms_test``). None: no RoI head (dense path only).
    roi_head: Optional[Dict[str, Any]]
    iou_branch: bool
    post_processing: PostProcessConfig
    test_views: TestViewsConfig
    source: str = "<config>"

    @property
    def num_class(self) -> int:
        return len(self.class_names)

    @property
    def grid_size(self) -> Tuple[int, int, int]:
        """(x, y, z) voxel grid size (OpenPCDet rounding)."""
        r, v = self.point_cloud_range, self.voxel_size
        return tuple(int(round((r[i + 3] - r[i]) / v[i])) for i in range(3))

    @property
    def sparse_shape(self) -> List[int]:
        """(z, y, x) spconv spatial shape = grid[::-1] + [1, 0, 0]."""
        gx, gy, gz = self.grid_size
        return [gz + 1, gy, gx]

    def max_voxels(self, training: bool) -> int:
        return self.max_voxels_train if training else self.max_voxels_test


@dataclass
class FullConfig:
    model: ModelConfig
    depth: Dict[str, Any] = field(default_factory=dict)   # untouched; see cmfiou_core.depth.config
    data: Dict[str, Any] = field(default_factory=dict)    # untouched; dataset / trainer options
    raw: Dict[str, Any] = field(default_factory=dict)     # the whole parsed YAML (for checkpoints)
    source: str = "<config>"
    inference: "InferenceConfig" = field(default_factory=lambda: InferenceConfig())


ENGINES = ("eager", "graph", "auto")


@dataclass(frozen=True)
class InferenceConfig:
    """``inference`` section. ``engine``: ``eager`` (spconv modules, the reference and the training path), ``graph``
    (the static-shape engine, ``cmfiou_core.engine``: one CUDA graph per capacity bucket on CUDA, the same static code
    on the CPU), ``auto`` (graph on CUDA, eager on the CPU, where the graph engine is slower)."""
    engine: str = "eager"

    def resolve(self, device) -> str:
        import torch

        if self.engine != "auto":
            return self.engine
        return "graph" if torch.device(device).type == "cuda" else "eager"


def _parse_inference(raw, source: str) -> InferenceConfig:
    sec = Section(raw or {}, "inference", source)
    cfg = InferenceConfig(engine=sec.str("engine", InferenceConfig.engine, choices=ENGINES))
    sec.finish()
    return cfg


def _tuple_f(sec: Section, key: str, default, length=None):
    return tuple(sec.floats(key, list(default), length=length))


def _tuple_i(sec: Section, key: str, default, length=None):
    return tuple(sec.ints(key, list(default), length=length))


def _parse_backbone(sec: Section) -> Backbone3DConfig:
    d = Backbone3DConfig()
    c = Backbone3DConfig(
        num_filters=_tuple_i(sec, "num_filters", d.num_filters, 4),
        out_features=sec.int("out_features", d.out_features, min=1),
        sd_branch=sec.bool("sd_branch", d.sd_branch),
        mm=sec.bool("mm", d.mm),
        resvc_branch=sec.bool("resvc_branch", d.resvc_branch),
        down_kernel_size=_tuple_i(sec, "down_kernel_size", d.down_kernel_size),
        down_stride=_tuple_i(sec, "down_stride", d.down_stride),
        down_filters=_tuple_i(sec, "down_filters", d.down_filters),
        layer_discard_rate=sec.float("layer_discard_rate", d.layer_discard_rate, min=0.0, max=0.99),
        view_batching=sec.str("view_batching", d.view_batching, choices=("wide", "separate")),
        image_plane_duplicates=sec.str("image_plane_duplicates", d.image_plane_duplicates,
                                       choices=("official", "mean")),
    )
    sec.finish()
    if not (len(c.down_kernel_size) == len(c.down_stride) == len(c.down_filters)):
        raise ConfigError(f"{sec.source}: '{sec.path}': down_kernel_size, down_stride and down_filters must have the "
                          "same length")
    if c.mm and len(set(c.num_filters)) != 1:
        raise ConfigError(f"{sec.source}: '{sec.path}.num_filters': the ResVC branch needs equal filters at all levels")
    return c


def _parse_bev(sec: Section) -> BEVConfig:
    d = BEVConfig()
    c = BEVConfig(_tuple_i(sec, "layer_nums", d.layer_nums), _tuple_i(sec, "layer_strides", d.layer_strides),
                  _tuple_i(sec, "num_filters", d.num_filters), _tuple_i(sec, "upsample_strides", d.upsample_strides),
                  _tuple_i(sec, "num_upsample_filters", d.num_upsample_filters))
    sec.finish()
    n = len(c.layer_nums)
    if not (len(c.layer_strides) == len(c.num_filters) == len(c.upsample_strides) == len(c.num_upsample_filters) == n):
        raise ConfigError(f"{sec.source}: '{sec.path}': layer_nums, layer_strides, num_filters, upsample_strides and "
                          "num_upsample_filters must have the same length")
    return c


def _parse_rpn(sec: Section, class_names) -> RPNConfig:
    raw = sec.raw("anchors", required=True)
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{sec.source}: '{sec.path}.anchors' must be a non-empty list (one entry per class)")
    anchors = []
    for i, a in enumerate(raw):
        s = Section(a, f"{sec.path}.anchors[{i}]", sec.source)
        ac = AnchorClassConfig(
            class_name=s.str("class_name", required=True, choices=CLASS_NAMES_ALLOWED),
            size=tuple(s.floats("size", required=True, length=3)),
            rotations=_tuple_f(s, "rotations", (0.0, 1.57)),
            bottom=s.float("bottom", required=True),
            matched_threshold=s.float("matched_threshold", required=True, min=0.0, max=1.0),
            unmatched_threshold=s.float("unmatched_threshold", required=True, min=0.0, max=1.0),
            feature_map_stride=s.int("feature_map_stride", 8, min=1),
        )
        s.finish()
        if ac.unmatched_threshold > ac.matched_threshold:
            raise ConfigError(f"{sec.source}: '{s.path}': unmatched_threshold > matched_threshold")
        anchors.append(ac)
    if tuple(a.class_name for a in anchors) != tuple(class_names):
        raise ConfigError(f"{sec.source}: '{sec.path}.anchors' must list the classes in class_names order "
                          f"{list(class_names)}, got {[a.class_name for a in anchors]}")
    if len({a.feature_map_stride for a in anchors}) != 1 or len({len(a.rotations) for a in anchors}) != 1:
        raise ConfigError(f"{sec.source}: '{sec.path}.anchors': all classes need the same stride and rotation count")
    ls = sec.sub("loss")
    dl = RPNLossConfig()
    loss = RPNLossConfig(ls.float("cls_weight", dl.cls_weight, min=0.0), ls.float("loc_weight", dl.loc_weight, min=0.0),
                         ls.float("dir_weight", dl.dir_weight, min=0.0),
                         _tuple_f(ls, "code_weights", dl.code_weights, 7),
                         ls.float("focal_alpha", dl.focal_alpha, min=0.0, max=1.0),
                         ls.float("focal_gamma", dl.focal_gamma, min=0.0),
                         ls.float("smooth_l1_beta", dl.smooth_l1_beta, min=0.0))
    ls.finish()
    d = RPNConfig(anchors=())
    pf = sec.float("pos_fraction", -1.0, max=1.0)
    c = RPNConfig(
        anchors=tuple(anchors),
        dir_offset=sec.float("dir_offset", d.dir_offset),
        dir_limit_offset=sec.float("dir_limit_offset", d.dir_limit_offset),
        num_dir_bins=sec.int("num_dir_bins", d.num_dir_bins, min=1),
        anchor_mask=sec.bool("anchor_mask", d.anchor_mask),
        pos_fraction=None if pf < 0 else pf,
        sample_size=sec.int("sample_size", d.sample_size, min=1),
        norm_by_num_examples=sec.bool("norm_by_num_examples", d.norm_by_num_examples),
        match_height=sec.bool("match_height", d.match_height),
        loss=loss,
    )
    sec.finish()
    return c


def _parse_post(sec: Section, num_class: int) -> PostProcessConfig:
    d = PostProcessConfig()

    def per_class(key, default, conv):
        v = sec.raw(key, None)
        if v is None:
            return tuple(default)
        v = v if isinstance(v, list) else [v]
        try:
            out = tuple(conv(x) for x in v)
        except (TypeError, ValueError):
            raise ConfigError(f"{sec.source}: '{sec.path}.{key}' must be a number or a list of numbers") from None
        if any(isinstance(x, bool) for x in v):
            raise ConfigError(f"{sec.source}: '{sec.path}.{key}' must be numeric")
        return out

    c = PostProcessConfig(
        score_mode=sec.str("score_mode", d.score_mode, choices=("cls", "rectified", "add")),
        rectifier_alpha=_tuple_f(sec, "rectifier_alpha", d.rectifier_alpha, num_class),
        score_thresh=sec.float("score_thresh", d.score_thresh, min=0.0, max=1.0),
        nms_type=sec.str("nms_type", d.nms_type, choices=("class_agnostic", "per_class")),
        nms_thresh=per_class("nms_thresh", d.nms_thresh, float),
        nms_pre_maxsize=per_class("nms_pre_maxsize", d.nms_pre_maxsize, int),
        nms_post_maxsize=per_class("nms_post_maxsize", d.nms_post_maxsize, int),
    )
    sec.finish()
    want = 1 if c.nms_type == "class_agnostic" else num_class
    for k in ("nms_thresh", "nms_pre_maxsize", "nms_post_maxsize"):
        n = len(getattr(c, k))
        if n not in (1, want):
            raise ConfigError(f"{sec.source}: '{sec.path}.{k}' needs 1 or {want} values for nms_type {c.nms_type}")
    return c


def _parse_views(sec: Section) -> TestViewsConfig:
    preset = sec.str("preset", "identity", choices=("identity", "official_x_trans", "custom"))
    if preset == "custom":
        rot = _tuple_f(sec, "rotation", (0.0,))
        flip = _tuple_i(sec, "flip", (0,))
        scale = _tuple_f(sec, "scale", (1.0,))
        if not (len(rot) == len(flip) == len(scale)) or not rot:
            raise ConfigError(f"{sec.source}: '{sec.path}': rotation, flip and scale need the same non-zero length")
        if any(f not in (0, 1) for f in flip) or any(s <= 0 for s in scale):
            raise ConfigError(f"{sec.source}: '{sec.path}': flip must be 0/1 and scale > 0")
        c = TestViewsConfig(rot, flip, scale)
    elif preset == "official_x_trans":
        c = OFFICIAL_X_TRANS
    else:
        c = TestViewsConfig()
    sec.finish()
    return c


def parse_model_config(model: Mapping[str, Any], source: str = "<config>") -> ModelConfig:
    sec = Section(model, "model", source)
    class_names = tuple(sec.raw("class_names", ["Car", "Pedestrian", "Cyclist"]))
    if not class_names or any(c not in CLASS_NAMES_ALLOWED for c in class_names) or len(set(class_names)) != len(
            class_names):
        raise ConfigError(f"{source}: 'model.class_names' must be distinct names from {list(CLASS_NAMES_ALLOWED)}")
    pcr = _tuple_f(sec, "point_cloud_range", (0, -40, -3, 70.4, 40, 1), 6)
    if any(pcr[i + 3] <= pcr[i] for i in range(3)):
        raise ConfigError(f"{source}: 'model.point_cloud_range' must be [xmin, ymin, zmin, xmax, ymax, zmax]")
    vs = _tuple_f(sec, "voxel_size", (0.05, 0.05, 0.05), 3)
    if any(v <= 0 for v in vs):
        raise ConfigError(f"{source}: 'model.voxel_size' must be positive")
    mpv = sec.int("max_points_per_voxel", 5, min=1)
    mv = sec.sub("max_voxels")
    mv_train, mv_test = mv.int("train", 16000, min=1), mv.int("test", 40000, min=1)
    mv.finish()
    vfe = sec.sub("vfe")
    flag_reduce = vfe.str("flag_reduce", "max", choices=("max", "mean"))
    vfe.finish()
    bb = _parse_backbone(sec.sub("backbone_3d"))
    bev = _parse_bev(sec.sub("bev"))
    rpn = _parse_rpn(sec.sub("rpn", required=True), class_names)
    roi = sec.raw("roi_head", None)
    iou_branch = False
    if roi is not None:
        if not isinstance(roi, Mapping):
            raise ConfigError(f"{source}: 'model.roi_head' must be a mapping")
        roi = dict(roi)
        roi["_source"] = source
        ib = roi.get("iou_branch", {}) or {}
        if not isinstance(ib, Mapping) or not isinstance(ib.get("enabled", False), bool):
            raise ConfigError(f"{source}: 'model.roi_head.iou_branch.enabled' must be true or false")
        iou_branch = bool(ib.get("enabled", False))
    post = _parse_post(sec.sub("post_processing"), len(class_names))
    views = _parse_views(sec.sub("test_views"))
    sec.finish()
    if post.score_mode != "cls" and not iou_branch:
        raise ConfigError(f"{source}: 'model.post_processing.score_mode' {post.score_mode!r} needs "
                          "model.roi_head.iou_branch.enable: true")
    cfg = ModelConfig(class_names, pcr, vs, mpv, mv_train, mv_test, flag_reduce, bb, bev, rpn, roi, iou_branch, post,
                      views, source)
    gx, gy, gz = cfg.grid_size
    st = rpn.anchors[0].feature_map_stride
    if gx % st or gy % st:
        raise ConfigError(f"{source}: grid {cfg.grid_size} is not divisible by the anchor feature_map_stride {st}")
    return cfg


def load_config(path: Union[str, Path]) -> FullConfig:
    """Load and validate a model YAML. Top-level keys: ``model`` (required), ``depth``, ``data`` (passed through),
    ``inference`` (:class:`InferenceConfig`)."""
    data = load_yaml(path)
    source = str(data.get("_source", path))
    top = Section(data, "", source)
    model = top.raw("model", required=True)
    depth = top.raw("depth", {}) or {}
    dat = top.raw("data", {}) or {}
    inf = top.raw("inference", {}) or {}
    top.finish()
    for name, v in (("depth", depth), ("data", dat), ("inference", inf)):
        if not isinstance(v, Mapping):
            raise ConfigError(f"{source}: '{name}' must be a mapping")
    return FullConfig(parse_model_config(model, source), dict(depth), dict(dat), data, source,
                      _parse_inference(inf, source))


def config_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> FullConfig:
    """Same as :func:`load_config` for an already parsed mapping (e.g. the config stored in a checkpoint)."""
    top = Section(data, "", source)
    model = top.raw("model", required=True)
    depth = top.raw("depth", {}) or {}
    dat = top.raw("data", {}) or {}
    inf = top.raw("inference", {}) or {}
    top.finish()
    return FullConfig(parse_model_config(model, source), dict(depth), dict(dat), dict(data), source,
                      _parse_inference(inf, source))
