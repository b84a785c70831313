"""CMF-IOU RoI head: official ``TEDMHead`` semantics + our IoU joint branch (``iou_joint.py``).

Forward contract (batch dict keys):
- reads ``batch_size``; ``batch_box_preds``/``batch_cls_preds`` (RPN, for the proposal layer, skipped when ``rois``
  is already present and ``use_given_rois`` is passed); ``multi_scale_3d_features[_mm][<view>]`` (spconv tensors
  ``x_conv3``/``x_conv4``; view suffix '' for view 0, '1', '2'); ``st_features_2d`` (PART); ``transform_param``
  (B, V, 3) optional test views [rot, flip, scale] (V = 1 or ``num_stages``); training: ``gt_boxes`` (B, M, 8).
- writes ``rois``, ``roi_scores``, ``roi_labels`` (proposal layer, view-0 frame), ``batch_box_preds`` (B, N, 7)
  (mean of the stages' boxes in the original frame), ``batch_cls_preds`` (B, N, 1) (mean stage logits),
  ``cls_preds_normalized`` False, ``has_class_labels`` True, ``batch_iou_preds`` (B, N, 1) decoded IoU in [0, 1]
  (only with the IoU branch enabled).

Test views: with no ``transform_param`` (or V == 1) all stages pool from the single view's tensors and (if given)
outputs are mapped back with the inverse of that view. With V == num_stages, stage t pools view t: RoIs go from the
view t-1 frame to view t (inverse X_TRANS of t-1, then X_TRANS of t), the PART score uses the RoIs mapped to the
view-0 frame, outputs are mapped to the original frame with the inverse of view t.

Training (``self.training``): proposal layer with ``nms_train``; per stage the ``ProposalTargetLayer`` re-samples
``target.roi_per_image`` RoIs (stage thresholds), the stage's decoded boxes (detached) become the next stage's RoIs.
``get_loss()`` -> (loss, tb_dict): per stage BCE cls + smooth-L1 reg + corner + bb_loss, the aux heads and the IoU
branch (see ``iou_joint.py`` for its target/loss).

Aux heads (``cls/reg_layers_P`` on the raw 512-d feature, ``_PI`` on the pseudo one): trained by default with weight
``loss.aux`` = 0.5 (``train_aux_heads: true``), as VirConv does. Reasons: CMF-IOU not training them is a key-name
bookkeeping bug of its loss template, not a design choice -- the heads are built, evaluated and
given the PART score; they add deep supervision to each modality branch so neither the raw nor the pseudo feature can
be ignored by the fused head (robustness when the camera is missing or the pseudo cloud is poor), at negligible cost.
``train_aux_heads: false`` reproduces the released behaviour (the heads then get no gradient and are skipped).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError, Section
from ..geometry.boxes import rotate_points_along_z
from ..geometry.coders import ResidualCoder
from ..geometry.view_transform import x_trans_backward, x_trans_forward  # noqa: F401 (re-exported)
from ..opcount import mark
from .grid_pool import _grid_index, build_pool_layers, roi_grid_pool
from .iou_joint import decode_iou_pred, encode_iou_target
from .proposal import TEST_DEFAULT, TRAIN_DEFAULT, ProposalConfig, proposal_layer
from .roi_targets import (LossWeights, ProposalTargetLayer, TargetConfig, canonical_targets, decode_rcnn_boxes,
                          iou_branch_targets, rcnn_cls_loss, rcnn_reg_loss, smooth_l1)


# ------------------------------------------------------------------------------------------------- config
@dataclass
class GridPoolConfig:
    grid_size: int = 6
    sources: List[str] = field(default_factory=lambda: ["x_conv3", "x_conv4"])
    strides: List[int] = field(default_factory=lambda: [4, 8])
    query_ranges: List[List[List[int]]] = field(default_factory=lambda: [[[2, 2, 2], [4, 4, 4]]] * 2)
    radii: List[List[float]] = field(default_factory=lambda: [[0.4, 0.8], [0.8, 1.6]])
    nsample: List[List[int]] = field(default_factory=lambda: [[16, 16], [16, 16]])
    mlps: List[List[List[int]]] = field(default_factory=lambda: [[[32, 32], [32, 32]]] * 2)


@dataclass
class PartConfig:
    enabled: bool = True
    in_channel: int = 256
    size: int = 7
    grid_offsets: List[float] = field(default_factory=lambda: [0.0, 40.0])
    featmap_stride: float = 0.4


@dataclass
class IoUBranchConfig:
    enabled: bool = False
    fc: List[int] = field(default_factory=lambda: [256, 256])


@dataclass
class RoIHeadConfig:
    num_stages: int = 3
    shared_fc: List[int] = field(default_factory=lambda: [256, 256])
    cls_fc: List[int] = field(default_factory=lambda: [256, 256])
    reg_fc: List[int] = field(default_factory=lambda: [256, 256])
    dp_ratio: float = 0.01
    attention_heads: int = 4
    pos_dim: int = 8
    voxel_size: List[float] = field(default_factory=lambda: [0.05, 0.05, 0.05])
    point_cloud_range: List[float] = field(default_factory=lambda: [0.0, -40.0, -3.0, 70.4, 40.0, 1.0])
    grid_pool: GridPoolConfig = field(default_factory=GridPoolConfig)
    grid_pool_mm: GridPoolConfig = field(default_factory=lambda: GridPoolConfig(grid_size=4))
    part: PartConfig = field(default_factory=PartConfig)
    iou_branch: IoUBranchConfig = field(default_factory=IoUBranchConfig)
    nms_train: ProposalConfig = field(default_factory=lambda: ProposalConfig(**vars(TRAIN_DEFAULT)))
    nms_test: ProposalConfig = field(default_factory=lambda: ProposalConfig(**vars(TEST_DEFAULT)))
    target: TargetConfig = field(default_factory=TargetConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    train_aux_heads: bool = True

    @classmethod
    def from_mapping(cls, data: Optional[Mapping[str, Any]], source: str = "<config>",
                     path: str = "model.roi_head") -> "RoIHeadConfig":
        """Validated construction from the ``roi_head:`` YAML mapping (unknown keys are errors)."""
        d = cls()
        s = Section(data, path, source)
        c = cls(
            num_stages=s.int("num_stages", d.num_stages, min=1, max=3),
            shared_fc=s.ints("shared_fc", d.shared_fc), cls_fc=s.ints("cls_fc", d.cls_fc),
            reg_fc=s.ints("reg_fc", d.reg_fc), dp_ratio=s.float("dp_ratio", d.dp_ratio, min=0.0, max=1.0),
            attention_heads=s.int("attention_heads", d.attention_heads, min=1),
            pos_dim=s.int("pos_dim", d.pos_dim, min=2),
            voxel_size=s.floats("voxel_size", d.voxel_size, length=3),
            point_cloud_range=s.floats("point_cloud_range", d.point_cloud_range, length=6),
            train_aux_heads=s.bool("train_aux_heads", d.train_aux_heads),
        )
        for name in ("grid_pool", "grid_pool_mm"):
            setattr(c, name, _parse_grid_pool(s.sub(name), getattr(d, name)))
        p = s.sub("part")
        c.part = PartConfig(p.bool("enabled", d.part.enabled), p.int("in_channel", d.part.in_channel, min=1),
                            p.int("size", d.part.size, min=2), p.floats("grid_offsets", d.part.grid_offsets, length=2),
                            p.float("featmap_stride", d.part.featmap_stride, min=1e-6))
        p.finish()
        ib = s.sub("iou_branch")
        c.iou_branch = IoUBranchConfig(ib.bool("enabled", d.iou_branch.enabled), ib.ints("fc", d.iou_branch.fc))
        ib.finish()
        c.nms_train = ProposalConfig.from_section(s.sub("nms_train"), d.nms_train)
        c.nms_test = ProposalConfig.from_section(s.sub("nms_test"), d.nms_test)
        t = s.sub("target")
        c.target = TargetConfig(
            roi_per_image=t.int("roi_per_image", d.target.roi_per_image, min=1),
            fg_ratio=t.float("fg_ratio", d.target.fg_ratio, min=0.0, max=1.0),
            cls_fg_thresh=t.floats("cls_fg_thresh", d.target.cls_fg_thresh, length=3),
            cls_bg_thresh=t.floats("cls_bg_thresh", d.target.cls_bg_thresh, length=3),
            cls_bg_thresh_lo=t.float("cls_bg_thresh_lo", d.target.cls_bg_thresh_lo, min=0.0, max=1.0),
            hard_bg_ratio=t.float("hard_bg_ratio", d.target.hard_bg_ratio, min=0.0, max=1.0),
            reg_fg_thresh=t.raw("reg_fg_thresh", d.target.reg_fg_thresh))
        t.finish()
        lw = s.sub("loss")
        c.loss = LossWeights(*(lw.float(k, getattr(d.loss, k), min=0.0) for k in ("cls", "reg", "corner", "bb", "aux", "iou")),
                             bb_center_huber=lw.float("bb_center_huber", d.loss.bb_center_huber, min=0.0, max=100.0))
        lw.finish()
        s.finish()
        return c


GRID_POOL_SOURCES = ("x_conv1", "x_conv2", "x_conv3", "x_conv4")


def _parse_grid_pool(g: Section, d: GridPoolConfig) -> GridPoolConfig:
    """One ``grid_pool`` / ``grid_pool_mm`` section: per source one stride and, per neighbourhood group of that
    source, a query range (3 ints >= 0), a radius (> 0), a sample count (>= 1) and an MLP (channel list, each >= 1)."""
    where = f"{g.source}: '{g.path}"

    def nested(key, default, leaf_ok, leaf_what, leaf_len=None):
        v = g.raw(key, default)
        if not isinstance(v, list) or not all(isinstance(per, list) and per for per in v):
            raise ConfigError(f"{where}.{key}' must be a list (one entry per source) of non-empty lists, got {v!r}")
        for i, per in enumerate(v):
            for j, leaf in enumerate(per):
                if leaf_len is not None:  # a list of leaf_len values (0: any non-zero length)
                    ok = isinstance(leaf, list) and len(leaf) > 0 and len(leaf) == (leaf_len or len(leaf)) \
                        and all(leaf_ok(x) for x in leaf)
                else:
                    ok = leaf_ok(leaf)
                if not ok:
                    raise ConfigError(f"{where}.{key}[{i}][{j}]' must be {leaf_what}, got {leaf!r}")
        return [list(per) for per in v]

    def is_int(x, lo):
        return isinstance(x, int) and not isinstance(x, bool) and x >= lo

    sources = g.raw("sources", list(d.sources))
    if not isinstance(sources, list) or not sources or any(x not in GRID_POOL_SOURCES for x in sources) \
            or len(set(sources)) != len(sources):
        raise ConfigError(f"{where}.sources' must be distinct names out of {list(GRID_POOL_SOURCES)}, got {sources!r}")
    gp = GridPoolConfig(
        grid_size=g.int("grid_size", d.grid_size, min=1), sources=list(sources),
        strides=g.ints("strides", d.strides),
        query_ranges=nested("query_ranges", d.query_ranges, lambda x: is_int(x, 0), "3 integers >= 0", 3),
        radii=nested("radii", d.radii, lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0,
                     "a number > 0"),
        nsample=nested("nsample", d.nsample, lambda x: is_int(x, 1), "an integer >= 1"),
        mlps=nested("mlps", d.mlps, lambda x: is_int(x, 1), "a non-empty list of integers >= 1", 0))
    g.finish()
    n = len(gp.sources)
    if not (len(gp.strides) == len(gp.query_ranges) == len(gp.radii) == len(gp.nsample) == len(gp.mlps) == n):
        raise ConfigError(f"{where}': sources/strides/query_ranges/radii/nsample/mlps need one entry per source")
    if any(st < 1 for st in gp.strides):
        raise ConfigError(f"{where}.strides' must be integers >= 1, got {gp.strides}")
    for i in range(n):
        groups = {len(gp.query_ranges[i]), len(gp.radii[i]), len(gp.nsample[i]), len(gp.mlps[i])}
        if len(groups) != 1:
            raise ConfigError(f"{where}': source {gp.sources[i]}: query_ranges, radii, nsample and mlps need one "
                              "entry per neighbourhood group (same lengths)")
    return gp


def _cfg(cfg: Union[None, Mapping, RoIHeadConfig]) -> RoIHeadConfig:
    if cfg is None:
        return RoIHeadConfig()
    if isinstance(cfg, RoIHeadConfig):
        return cfg
    return RoIHeadConfig.from_mapping(cfg, cfg.get("_source", "<config>") if isinstance(cfg, Mapping) else "<config>")


# ------------------------------------------------------------------------------------------------- modules
def make_fc_layers(cin: int, cout: Optional[int], fc_list: Sequence[int], dp_ratio: float) -> nn.Sequential:
    """Linear(no bias) -> BN -> ReLU (-> Dropout after the first) ... (-> Linear(bias) to ``cout``)."""
    layers: List[nn.Module] = []
    pre = cin
    for k, c in enumerate(fc_list):
        layers += [nn.Linear(pre, c, bias=False), nn.BatchNorm1d(c), nn.ReLU()]
        pre = c
        if dp_ratio >= 0 and k == 0:
            layers.append(nn.Dropout(dp_ratio))
    if cout is not None:
        layers.append(nn.Linear(pre, cout, bias=True))
    return nn.Sequential(*layers)


class PositionalEmbedding(nn.Module):
    def __init__(self, demb: int):
        super().__init__()
        inv_freq = 1 / (10000 ** (torch.arange(0.0, demb, 2.0) / demb))
        self.register_buffer("inv_freq", inv_freq)

    def forward(self, pos_seq: torch.Tensor, batch_size: int) -> torch.Tensor:
        sinusoid = torch.outer(pos_seq.to(self.inv_freq.dtype), self.inv_freq)
        emb = torch.cat([sinusoid.sin(), sinusoid.cos()], dim=-1)
        return emb[:, None, :].expand(-1, batch_size, -1)


class CrossAttention(nn.Module):
    """Cross-stage attention: keys/values = stage features 1..t (+ position embedding), query = stage t."""

    def __init__(self, hidden_dim: int, pos_dim: int = 8, heads: int = 4):
        super().__init__()
        self.pos_en = PositionalEmbedding(pos_dim)
        self.Q_linear = nn.Linear(hidden_dim + pos_dim, hidden_dim, bias=False)
        self.K_linear = nn.Linear(hidden_dim + pos_dim, hidden_dim, bias=False)
        self.V_linear = nn.Linear(hidden_dim + pos_dim, hidden_dim, bias=False)
        self.att = nn.MultiheadAttention(hidden_dim, heads)

    def forward(self, inputs: torch.Tensor, q_in: torch.Tensor) -> torch.Tensor:
        """inputs (L, R, C), q_in (1, R, C) -> (1, R, C)."""
        L, R = inputs.shape[0], inputs.shape[1]
        pos = torch.arange(1, L + 1, device=inputs.device)
        inputs_pos = torch.cat([inputs, self.pos_en(pos, R).to(inputs.dtype)], -1)
        pos_q = torch.full((1,), L, dtype=torch.long, device=inputs.device)  # no host->device copy
        q_pos = torch.cat([q_in, self.pos_en(pos_q, R).to(inputs.dtype)], -1)
        return self.att(self.Q_linear(q_pos), self.K_linear(inputs_pos), self.V_linear(inputs_pos),
                         need_weights=False)[0]


# ------------------------------------------------------------------------------------------------- view transforms
# ------------------------------------------------------------------------------------------------- head
class RoIHead(nn.Module):
    """3-stage CMF-IOU RoI head (official ``TEDMHead`` state_dict layout under ``roi_head.``; + ``iou_layers``)."""

    def __init__(self, cfg: Union[None, Mapping, RoIHeadConfig] = None,
                 input_channels: Optional[Dict[str, int]] = None, num_class: int = 1):
        super().__init__()
        self.cfg = c = _cfg(cfg)
        ic = dict(input_channels or {"x_conv3": 64, "x_conv4": 64})
        self.box_coder = ResidualCoder(7)
        self.target_layer = ProposalTargetLayer(c.target)
        self.num_class = num_class

        def pool(gp: GridPoolConfig):
            for s in gp.sources:
                if s not in ic:
                    raise ConfigError(f"roi_head: grid pool source {s!r} has no input channel count (have {sorted(ic)})")
            return build_pool_layers(gp.sources, ic, gp.query_ranges, gp.radii, gp.nsample, gp.mlps)

        self.roi_grid_pool_layers = pool(c.grid_pool)
        self.roi_grid_pool_layers_mm = pool(c.grid_pool_mm)
        cpool = sum(sum(int(m[-1]) for m in mm) for mm in c.grid_pool.mlps)
        cpool_mm = sum(sum(int(m[-1]) for m in mm) for mm in c.grid_pool_mm.mlps)
        pre = c.grid_pool.grid_size ** 3 * cpool
        pre_mm = c.grid_pool_mm.grid_size ** 3 * cpool_mm
        hid = c.shared_fc[-1]
        self.shared_fc_layers = nn.ModuleList([make_fc_layers(pre, None, c.shared_fc, c.dp_ratio)])
        self.shared_fc_layers_mm = nn.ModuleList([make_fc_layers(pre_mm, None, c.shared_fc, c.dp_ratio)])
        self.cls_layers = nn.ModuleList([make_fc_layers(4 * hid, num_class, c.cls_fc, c.dp_ratio)])
        self.reg_layers = nn.ModuleList([make_fc_layers(4 * hid, 7, c.reg_fc, c.dp_ratio)])
        self.cls_layers_P = nn.ModuleList([make_fc_layers(2 * hid, num_class, c.cls_fc, c.dp_ratio)])
        self.reg_layers_P = nn.ModuleList([make_fc_layers(2 * hid, 7, c.reg_fc, c.dp_ratio)])
        self.cls_layers_PI = nn.ModuleList([make_fc_layers(2 * hid, num_class, c.cls_fc, c.dp_ratio)])
        self.reg_layers_PI = nn.ModuleList([make_fc_layers(2 * hid, 7, c.reg_fc, c.dp_ratio)])
        if c.iou_branch.enabled:
            self.iou_layers = nn.ModuleList([make_fc_layers(4 * hid, 1, c.iou_branch.fc, c.dp_ratio)])
        else:
            self.iou_layers = None
        if c.part.enabled:
            pc = c.part.in_channel
            self.conv_part = nn.Sequential(
                nn.Conv2d(pc, pc, 3, 1, padding=1, bias=False), nn.BatchNorm2d(pc, eps=1e-3, momentum=0.01),
                nn.ReLU(), nn.Conv2d(pc, c.part.size ** 2, 1, 1, padding=0, bias=False))
        else:
            self.conv_part = None
        self.cross_attention_layers = nn.ModuleList([CrossAttention(hid, c.pos_dim, c.attention_heads)])
        self.cross_attention_layers_mm = nn.ModuleList([CrossAttention(hid, c.pos_dim, c.attention_heads)])
        self.init_weights()
        self.forward_ret_dict: Dict[str, Any] = {}
        self.record: Optional[Dict[str, torch.Tensor]] = None  # set to {} to record intermediates (tests)

    def init_weights(self) -> None:
        for seq in [*self.shared_fc_layers, *self.shared_fc_layers_mm, *self.cls_layers, *self.reg_layers,
                    *self.cls_layers_P, *self.reg_layers_P, *self.cls_layers_PI, *self.reg_layers_PI,
                    *(self.iou_layers or [])]:
            for m in seq.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_normal_(m.weight)
                    if m.bias is not None:
                        nn.init.constant_(m.bias, 0)
        for heads in (self.cls_layers, self.reg_layers, self.cls_layers_P, self.reg_layers_P, self.cls_layers_PI,
                      self.reg_layers_PI, self.iou_layers or []):
            for seq in heads:
                nn.init.normal_(seq[-1].weight, mean=0, std=0.01)
                nn.init.constant_(seq[-1].bias, 0)

    # --------------------------------------------------------------------------------------------- pieces
    def _pool(self, batch_dict, rois: torch.Tensor, view: int, mm: bool, cache: Optional[dict] = None) -> torch.Tensor:
        c = self.cfg
        gp = c.grid_pool_mm if mm else c.grid_pool
        key = "multi_scale_3d_features" + ("_mm" if mm else "") + ("" if view == 0 else str(view))
        if key not in batch_dict:
            raise KeyError(f"RoIHead: batch_dict has no {key!r} (needed for view {view})")
        layers = self.roi_grid_pool_layers_mm if mm else self.roi_grid_pool_layers
        return roi_grid_pool(layers, gp.sources, dict(zip(gp.sources, gp.strides)), gp.grid_size, c.voxel_size,
                             c.point_cloud_range, rois, batch_dict[key], int(batch_dict["batch_size"]), cache)

    def part_scores(self, parts_feat: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """parts_feat (B, S^2, H, W), rois (B, N, 7) in the BEV frame -> (B*N, 1) mean position-sensitive score."""
        pc = self.cfg.part
        G = pc.size
        B, N = rois.shape[0], rois.shape[1]
        H, W = parts_feat.shape[2], parts_feat.shape[3]
        r = rois.reshape(B * N, -1)
        idx = _grid_index(G, 2, r.device)                                 # (G^2, 2) x slowest (= ones.nonzero())
        size = r[:, 3:5]
        local = idx[None] / (G - 1) * size[:, None, :] - size[:, None, :] / 2  # (R, G^2, 2)
        local = torch.cat([local, torch.ones_like(local[..., 0:1])], dim=-1)
        g = rotate_points_along_z(local, r[:, 6]) + r[:, None, 0:3]
        scale = 1.0 / pc.featmap_stride
        x = (g[..., 0].view(B, N, G * G).permute(0, 2, 1) + pc.grid_offsets[0]) * scale  # (B, G^2, N)
        y = (g[..., 1].view(B, N, G * G).permute(0, 2, 1) + pc.grid_offsets[1]) * scale
        samples = torch.stack([x / W, y / H], dim=-1) * 2 - 1             # (B, G^2, N, 2)
        img = parts_feat.reshape(B * G * G, 1, H, W)
        out = F.grid_sample(img, samples.reshape(B * G * G, N, 1, 2), mode="bilinear", padding_mode="zeros",
                            align_corners=False)                          # (B*G^2, 1, N, 1)
        out = out.view(B, G * G, N).mean(dim=1)
        return out.reshape(B * N, 1)

    def _rec(self, name: str, value: torch.Tensor) -> None:
        if self.record is not None:
            self.record[name] = value.detach().clone()

    # --------------------------------------------------------------------------------------------- forward
    def forward(self, batch_dict: Dict[str, Any], use_given_rois: bool = False,
                stage_rois: Optional[Sequence[torch.Tensor]] = None) -> Dict[str, Any]:
        """``use_given_rois``: keep ``batch_dict['rois'/'roi_scores'/'roi_labels']`` (skip the proposal layer).
        ``stage_rois`` (eval, tests): per-stage input RoIs (B, N, 7) in the stage's view frame, replacing the chained
        previous-stage boxes (isolates stages when comparing against a reference)."""
        c = self.cfg
        mark("proposal")
        if not (use_given_rois and "rois" in batch_dict):
            proposal_layer(batch_dict, c.nms_train if self.training else c.nms_test)
        B = int(batch_dict["batch_size"])
        tp = batch_dict.get("transform_param") if not self.training else None
        V = 1 if tp is None else int(tp.shape[1])
        S = c.num_stages
        if V not in (1, S):
            raise ValueError(f"RoIHead: transform_param has {V} views; expected 1 or num_stages={S}")
        parts_feat = self.conv_part(batch_dict["st_features_2d"]) if self.conv_part is not None else None
        if parts_feat is not None:
            self._rec("parts_feat", parts_feat)
        rois = batch_dict["rois"]
        roi_scores = batch_dict["roi_scores"]
        roi_labels = batch_dict["roi_labels"]
        shared, shared_mm = [], []
        preds, scores, ious = [], [], []
        pool_cache: Dict = {}  # voxel centres / dense voxel->row maps, reused by the stages
        self.forward_ret_dict = {}
        for t in range(S):
            view = t if V == S else 0
            targets = None
            if self.training:
                if "gt_boxes" not in batch_dict:
                    raise KeyError("RoIHead training needs batch_dict['gt_boxes'] (B, M, 8)")
                targets = self.target_layer.sample(rois.detach(), roi_scores.detach(), roi_labels,
                                                   batch_dict["gt_boxes"], t)
                targets = canonical_targets(targets)
                rois, roi_scores, roi_labels = targets["rois"], targets["roi_scores"], targets["roi_labels"]
            if t >= 1 and V > 1:
                rois = x_trans_forward(x_trans_backward(rois, tp[:, t - 1]), tp[:, t])
            if stage_rois is not None and not self.training:
                rois = stage_rois[t]
            rois0 = rois if (V == 1 or view == 0) else x_trans_forward(x_trans_backward(rois, tp[:, view]), tp[:, 0])
            self._rec(f"s{t}_rois_in", rois)
            R = rois.shape[0] * rois.shape[1]
            mark(f"s{t}.pool_raw")
            pooled = self._pool(batch_dict, rois, view, mm=False, cache=pool_cache)
            mark(f"s{t}.pool_mm")
            pooled_mm = self._pool(batch_dict, rois, view, mm=True, cache=pool_cache)
            mark(f"s{t}.head")
            self._rec(f"s{t}_pooled_raw", pooled)
            self._rec(f"s{t}_pooled_mm", pooled_mm)
            sh = self.shared_fc_layers[0](pooled.reshape(R, -1)).unsqueeze(0)
            sh_mm = self.shared_fc_layers_mm[0](pooled_mm.reshape(R, -1)).unsqueeze(0)
            self._rec(f"s{t}_shared", sh[0])
            self._rec(f"s{t}_shared_mm", sh_mm[0])
            shared.append(sh)
            shared_mm.append(sh_mm)
            xa = self.cross_attention_layers[0](torch.cat(shared, 0), sh)
            xa_mm = self.cross_attention_layers_mm[0](torch.cat(shared_mm, 0), sh_mm)
            self._rec(f"s{t}_xattn", xa)
            self._rec(f"s{t}_xattn_mm", xa_mm)
            cur = torch.cat([xa, sh], -1).squeeze(0)
            cur_mm = torch.cat([xa_mm, sh_mm], -1).squeeze(0)
            final = torch.cat([cur_mm, cur], -1)
            rcnn_cls = self.cls_layers[0](final)
            rcnn_reg = self.reg_layers[0](final)
            self._rec(f"s{t}_rcnn_cls_nopart", rcnn_cls)
            self._rec(f"s{t}_rcnn_reg", rcnn_reg)
            need_aux = self.training and c.train_aux_heads and c.loss.aux > 0
            if need_aux or self.record is not None:
                cls_p, reg_p = self.cls_layers_P[0](cur), self.reg_layers_P[0](cur)
                cls_pi, reg_pi = self.cls_layers_PI[0](cur_mm), self.reg_layers_PI[0](cur_mm)
                self._rec(f"s{t}_rcnn_cls_p_nopart", cls_p)
                self._rec(f"s{t}_rcnn_reg_p", reg_p)
                self._rec(f"s{t}_rcnn_cls_pi_nopart", cls_pi)
                self._rec(f"s{t}_rcnn_reg_pi", reg_pi)
            if parts_feat is not None:
                ps = self.part_scores(parts_feat, rois0)
                self._rec(f"s{t}_part_scores", ps)
                rcnn_cls = rcnn_cls + ps
                if need_aux:
                    cls_p, cls_pi = cls_p + ps, cls_pi + ps
            boxes = decode_rcnn_boxes(rcnn_reg, rois.reshape(R, -1)[:, :7], self.box_coder)
            boxes = boxes.view(B, -1, 7)
            cls_b = rcnn_cls.view(B, -1, rcnn_cls.shape[-1])
            self._rec(f"s{t}_batch_cls_preds", cls_b)
            self._rec(f"s{t}_batch_box_preds", boxes)
            iou_raw = self.iou_layers[0](final) if self.iou_layers is not None else None
            if self.training:
                targets["rcnn_cls"], targets["rcnn_reg"] = rcnn_cls, rcnn_reg
                targets["boxes"] = boxes.view(R, 7)
                if need_aux:
                    targets["rcnn_cls_p"], targets["rcnn_reg_p"] = cls_p, reg_p
                    targets["rcnn_cls_pi"], targets["rcnn_reg_pi"] = cls_pi, reg_pi
                if iou_raw is not None:
                    targets["rcnn_iou"] = iou_raw
                self.forward_ret_dict[f"targets_dict{t}"] = targets
            rois = boxes.detach() if self.training else boxes
            roi_scores = cls_b[..., 0].detach() if self.training else cls_b[..., 0]
            out = boxes if tp is None else x_trans_backward(boxes, tp[:, view])
            preds.append(out)
            scores.append(cls_b)
            if iou_raw is not None:
                ious.append(iou_raw.view(B, -1, 1))
        mark("final")
        batch_dict["batch_box_preds"] = torch.stack(preds).mean(0)
        batch_dict["batch_cls_preds"] = torch.stack(scores).mean(0)
        batch_dict["cls_preds_normalized"] = False
        batch_dict["has_class_labels"] = True
        if ious:
            batch_dict["batch_iou_preds"] = decode_iou_pred(torch.stack(ious).mean(0))
        if self.training:
            batch_dict["roi_labels"] = roi_labels
        return batch_dict

    # --------------------------------------------------------------------------------------------- loss
    def get_loss(self, tb_dict: Optional[Dict[str, float]] = None):
        """Sum over stages of cls (BCE) + reg (smooth-L1 + corner + bb) [+ aux heads x loss.aux] [+ IoU x loss.iou].

        Returns (loss scalar tensor, tb_dict of floats)."""
        tb = {} if tb_dict is None else tb_dict
        w = self.cfg.loss
        total = None
        for key, td in self.forward_ret_dict.items():
            t = key[len("targets_dict"):]
            parts = {"cls": rcnn_cls_loss(td["rcnn_cls"], td["rcnn_cls_labels"]) * w.cls}
            parts.update(rcnn_reg_loss(td["rcnn_reg"], td, self.box_coder, w))
            if "rcnn_cls_p" in td:
                for suf in ("p", "pi"):
                    aux = rcnn_cls_loss(td[f"rcnn_cls_{suf}"], td["rcnn_cls_labels"]) * w.cls
                    ar = rcnn_reg_loss(td[f"rcnn_reg_{suf}"], td, self.box_coder, w)
                    parts[f"aux_{suf}"] = w.aux * (aux + ar["reg"] + ar["corner"] + ar["bb"])
            if "rcnn_iou" in td:
                gt_src = td["gt_of_rois_src"].reshape(-1, td["gt_of_rois_src"].shape[-1])
                has = gt_src[:, 7].long() == td["roi_labels"].reshape(-1).long()
                iou_t = iou_branch_targets(td["boxes"], gt_src[:, :7], has)
                parts["iou"] = smooth_l1(td["rcnn_iou"].view(-1) - encode_iou_target(iou_t), 1.0 / 9.0).mean() * w.iou
            for k, v in parts.items():
                tb[f"rcnn_{k}_{t}"] = float(v.detach())
                total = v if total is None else total + v
        if total is None:
            raise RuntimeError("RoIHead.get_loss: no training forward was run")
        tb["rcnn_loss"] = float(total.detach())
        return total, tb
