"""The whole eval forward after VFE as one static-shape function, replayed as ONE CUDA graph per capacity bucket.

``FrameGraph(model, engine_backbone)`` runs, with fixed shapes and no host synchronisation:

    backbone engine (S2D + ResVC)  ->  height compression (scatter of the padded stride-8 tensor into the dense
    volume)  ->  BEV backbone  ->  dense head (anchor mask as a validity mask instead of a compaction)  ->  static RoI
    head (proposal NMS, 3 stages, IoU branch)  ->  static post-processing

and returns the frame's detections after ONE device->host copy (detections, their count and every overflow flag and
site count). When a backbone capacity overflowed, the capacities grow from the exact counts of this frame and the
frame is run again without a graph (the next frame captures a new one), so no frame's result is ever truncated.

Equality with the eager model: the dense volume is spconv's ``dense()`` layout (channel ``c * D + d``); the anchor
mask is VirConv's ``get_anchor_mask`` computed as a boolean matrix product (no ``nonzero``); masked anchors get no
proposal (their scores are never selected), which is the eager compaction's result whenever a frame has at least
``nms_pre_maxsize`` unmasked anchors, and an equal one otherwise (the eager layer then takes fewer candidates).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..opcount import mark
from .graphs import capture
from .padded import PaddedSparse
from .runtime import EngineBackbone

log = logging.getLogger(__name__)


def dense_volume(t: PaddedSparse, batch_size: int) -> torch.Tensor:
    """Samples ``< batch_size`` of a padded (b, z, y, x) tensor as spconv's ``dense()``: (B, C, D, H, W) float32."""
    D, H, W = (int(v) for v in t.spatial_shape)
    C = t.features.shape[1]
    idx = t.indices.long()
    size = int(batch_size) * D * H * W
    ok = t.valid & (idx[:, 0] < int(batch_size))
    flat = ((idx[:, 0] * D + idx[:, 1]) * H + idx[:, 2]) * W + idx[:, 3]
    flat = torch.where(ok, flat, torch.full_like(flat, size))              # padding / other views -> dump row
    buf = t.features.new_zeros((size + 1, C), dtype=torch.float32)
    buf.index_copy_(0, flat, t.features.float())
    return buf[:size].view(int(batch_size), D, H, W, C).permute(0, 4, 1, 2, 3)


def anchor_mask_static(points_xy: torch.Tensor, valid: torch.Tensor, shape_hw: Tuple[int, int], point_cloud_range,
                       voxel_size_x: float, stride_bev: int = 8) -> torch.Tensor:
    """``model.rpn.anchor_mask_from_points`` with static shapes: (P, 2) x, y of the raw points, (P,) validity ->
    (H, W) bool. A coarse cell i covers fine rows ``10 i - 10 .. 10 i + 9`` (mod H, the eager negative wrap), so the
    dilation is ``(R @ coarse @ C^T) > 0`` with R[r, i] = ((r - 10 i + 10) mod H) < 20 (columns alike)."""
    H, W = (int(v) for v in shape_hw)
    stride = float(np.round(voxel_size_x * stride_bev * 10.0))
    hl, wl = H // 10, W // 10
    dev = points_xy.device
    in_x = ((points_xy[:, 0] - point_cloud_range[0]) / stride).long().clamp(max=wl - 1)
    in_y = ((points_xy[:, 1] - point_cloud_range[1]) / stride).long().clamp(max=hl - 1)
    # eager ``large[in_y, in_x]``: negative indices (points below the range) wrap as Python indexing does
    in_x = torch.remainder(in_x, wl)
    in_y = torch.remainder(in_y, hl)
    cell = torch.where(valid, in_y * wl + in_x, torch.full_like(in_x, hl * wl))
    large = torch.zeros(hl * wl + 1, dtype=torch.float32, device=dev)
    large.index_fill_(0, cell, 1.0)
    large = large[:hl * wl].view(hl, wl)
    r = torch.arange(H, device=dev)[:, None]
    i = torch.arange(hl, device=dev)[None, :]
    R = (torch.remainder(r - 10 * i + 10, H) < 20).float()                 # (H, hl)
    c = torch.arange(W, device=dev)[:, None]
    j = torch.arange(wl, device=dev)[None, :]
    Cm = (torch.remainder(c - 10 * j + 10, W) < 20).float()                # (W, wl)
    return (R @ large @ Cm.T) > 0.5


def _fp32(t: PaddedSparse) -> PaddedSparse:
    """The RoI head pools fp32 features whatever the backbone engine's dtype."""
    return t if t.features.dtype == torch.float32 else t.replace_feature(t.features.float())


class StaticDense(nn.Module):
    """Height compression + BEV backbone + dense head (eval) on the padded stride-8 tensor; the anchor mask becomes
    a per-anchor validity. Returns ``(st_features_2d, batch_box_preds (B, H*W*A, 7), batch_cls_preds, anchor_valid
    (B, H*W*A))``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.bev = model.backbone_2d
        self.head = model.dense_head

    def forward(self, encoded: PaddedSparse, batch_size: int, points_xy: torch.Tensor, points_valid: torch.Tensor):
        vol = dense_volume(encoded, batch_size)
        B, C, D, H, W = vol.shape
        st = self.bev({"spatial_features": vol.reshape(B, C * D, H, W)})["st_features_2d"]
        head = self.head
        _, _, h, w = st.shape
        A = head.num_anchors_per_location
        if head.rpn.anchor_mask:
            mask = anchor_mask_static(points_xy, points_valid, (h, w), head.pc_range, head.voxel_size_x)
        else:
            mask = torch.ones((h, w), dtype=torch.bool, device=st.device)
        anchors = head.anchors_all.to(st.device).reshape(h * w, A, 7)
        cls = head.conv_cls(st).permute(0, 2, 3, 1).reshape(B, h * w, -1)
        box = head.conv_box(st).permute(0, 2, 3, 1).reshape(B, h * w, -1)
        dirc = head.conv_dir_cls(st).permute(0, 2, 3, 1).reshape(B, h * w, -1)
        batch_cls, batch_box = head.generate_predicted_boxes(B, cls, box, dirc, anchors)
        valid = mask.reshape(h * w, 1).expand(h * w, A).reshape(1, -1).expand(B, -1)
        return st, batch_box, batch_cls, valid


class FrameGraph:
    """Backbone engine -> BEV -> RPN -> static RoI head -> post-processing, captured as one CUDA graph (on the CPU the
    same static code runs without a graph). ``__call__(batch after VFE) -> FrameDetections`` of sample 0."""

    # candidate box pairs (circle overlap) whose rotated IoU an NMS evaluates per call: all K(K-1)/2 pairs of the 2000
    # proposals would be 2M (8 polygon-clipping passes of ~150 kernels); overlapping pairs of a real frame are far
    # fewer. More sets the overflow flag (a warning: the selection may differ from the eager NMS).
    PAIR_CAPACITY = 1 << 18
    POINT_CAPACITY = 1 << 18    # raw points for the anchor mask (an HDL-64 frame has ~120k); more is an error

    def __init__(self, model: nn.Module, backbone: EngineBackbone, use_graph: Optional[bool] = None,
                 pair_capacity: Optional[int] = PAIR_CAPACITY, point_capacity: int = POINT_CAPACITY):
        from ..model.postprocess import PostProcessConfig
        from .roi import StaticRoIHead

        if model.roi_head is None:
            raise ValueError("FrameGraph needs a model with a RoI head")
        self.model = model
        self.backbone = backbone
        self.dense = StaticDense(model)
        self.static = StaticRoIHead(model.roi_head, pair_capacity=pair_capacity)
        self._post_cfg = PostProcessConfig.from_any(model.cfg.post_processing)
        self.use_graph = use_graph
        self.point_capacity = int(point_capacity)
        self._graphs: Dict[Tuple, Any] = {}
        self.captures = 0
        self.replays = 0
        self.last_overflow = 0          # backbone sites that did not fit (before the re-run)
        self.last_nms_overflow = False

    # ------------------------------------------------------------------ the static function
    def _forward(self, B: int, V: int, args, pts_xy, pts_valid, tp, extra=None):
        bb = self.backbone
        out = bb._static(*args, B * V)
        st, box, cls, valid = self.dense(out["encoded"], B, pts_xy, pts_valid)
        raw = {k: _fp32(out["raw"][k]) for k in ("x_conv3", "x_conv4")}
        mm = {k: _fp32(out["mm"][k]) for k in ("x_conv3", "x_conv4")} if "mm" in out else None
        res = self.static(raw, mm, st, box, cls, tp, anchor_valid=valid)
        det = self.static.detect(res, self._post_cfg)
        packed = torch.cat([det.boxes[0].float(), det.labels[0].float()[:, None], det.cls[0].float()[:, None],
                            det.iou[0].float()[:, None], det.score[0].float()[:, None]], 1)
        head = torch.stack([det.count[0].float(), det.overflow.float(), out["overflow"].float()])
        parts = [head, out["counts"].float()] + ([] if extra is None else [extra.float().reshape(-1)])
        flat = torch.cat(parts + [packed.reshape(-1)])
        return flat, (tuple(packed.shape), int(out["counts"].numel()), 0 if extra is None else int(extra.numel()))

    def _points(self, batch, dev):
        pts = batch["points"]
        n = pts.shape[0]
        if n > self.point_capacity:
            raise ValueError(f"FrameGraph: {n} raw points exceed the point capacity {self.point_capacity}")
        xy = torch.zeros((self.point_capacity, 2), dtype=torch.float32, device=dev)
        xy[:n] = pts[:, 1:3].float()
        return xy, torch.full((), n, dtype=torch.long, device=dev)

    # ------------------------------------------------------------------ per frame
    @torch.no_grad()
    def __call__(self, batch: Dict[str, Any]):
        """The eager batch after VFE -> FrameDetections of sample 0."""
        from .backbone import calib_tensors

        bb = self.backbone
        V, sfx = bb._views(batch)
        for s in sfx:
            if batch["voxel_features" + s].shape[0] == 0:
                raise ValueError("VCEConv8x: no raw LiDAR voxels in the batch (empty or fully out-of-range cloud)")
        B = int(batch["batch_size"])
        ins = bb._gather_inputs(batch, B, V, sfx)
        raw_f, raw_c, raw_n = ins[""]
        dev = raw_f.device
        has_mm = bb.eager.cfg.mm and "_mm" in ins and any(batch["voxel_features_mm" + s].shape[0] > 0 for s in sfx)
        mm_f, mm_c, mm_n = ins["_mm"] if has_mm else (None, None, None)
        cal = calib_tensors(list(batch["calib"]) * V, dev)
        trans = bb._trans(batch, B, V, dev)
        args = (raw_f, raw_c, raw_n, mm_f, mm_c, mm_n, cal["m_rect"], cal["p2_t"], trans)
        pts_xy, pts_n = self._points(batch, dev)
        tp = batch.get("transform_param")
        tp = None if tp is None else tp.float().to(dev)
        pts_valid = torch.arange(self.point_capacity, device=dev) < pts_n
        return self.run(B, V, args, pts_xy, pts_valid, tp)[0]

    @torch.no_grad()
    def run(self, B: int, V: int, args, pts_xy, pts_valid, tp, extra: Optional[torch.Tensor] = None):
        """The static function on prepared inputs (``args`` = ``EngineBackbone._static``'s, (P, 2) raw point x, y
        and (P,) validity for the anchor mask, test views) -> (FrameDetections of sample 0, ``extra`` (a 1-D device
        tensor, e.g. an upstream stage's counts and overflow flags) as host floats, read with the same one
        device->host copy)."""
        from ..model.postprocess import FrameDetections

        bb = self.backbone
        dev = args[0].device

        def run_static():
            flat, meta = self._forward(B, V, args, pts_xy, pts_valid, tp, extra)
            flat = flat.cpu()
            mark("frame.host")      # opcount: what follows reads the host copy
            return flat, meta

        first = not bb.calibrated
        if first:
            # first frame: every conv sized to its exact site count (host syncs), which sets the capacities
            bb.engine.dynamic = True
            try:
                flat, meta = run_static()
            finally:
                bb.engine.dynamic = False
        else:
            use_graph = self.use_graph if self.use_graph is not None else dev.type == "cuda"
            flat, meta = self._run(run_static, list(args) + [pts_xy, pts_valid, tp, extra], B, V, len(args)) \
                if use_graph else run_static()
        shape, nc, ne = meta
        counts, overflow = [int(c) for c in flat[3:3 + nc]], int(flat[2])
        attempts = 0
        while first or overflow:
            first = False
            self._graphs.clear()
            if not bb.recalibrate(counts, overflow, "FrameGraph: backbone"):
                break
            attempts += 1
            if attempts > 8:
                raise RuntimeError(f"FrameGraph: backbone capacities still overflow after 8 re-runs ({overflow} sites)")
            flat, meta = run_static()
            shape, nc, ne = meta
            counts, overflow = [int(c) for c in flat[3:3 + nc]], int(flat[2])
        self.last_overflow = overflow
        bb.last_counts = counts
        self.last_nms_overflow = bool(flat[1])
        if self.last_nms_overflow:
            log.warning("FrameGraph: a fixed NMS pair capacity overflowed on this frame; detections may differ from "
                        "the eager NMS")
        n = int(flat[0])
        rows = flat[3 + nc + ne:].view(shape)[:n]
        extra_host = flat[3 + nc:3 + nc + ne].tolist()
        return FrameDetections(rows[:, :7], rows[:, 7].long(), rows[:, 8], rows[:, 9], rows[:, 10]), extra_host

    def _run(self, run_static, inputs, B: int, V: int, n_args: int):
        """Replay (capturing first) the graph of this bucket; -> (flat result on the host, meta)."""
        key = (B, V) + tuple(None if a is None else (tuple(a.shape), a.dtype) for a in inputs)
        g = self._graphs.get(key)
        if g is None:
            static_in = [None if a is None else a.clone() for a in inputs]

            def fn():
                return self._forward(B, V, static_in[:n_args], static_in[n_args], static_in[n_args + 1],
                                     static_in[n_args + 2], static_in[n_args + 3])

            graph, (out, meta) = capture(fn)
            g = (graph, static_in, out, meta)
            self._graphs[key] = g
            self.captures += 1
            log.info("FrameGraph: captured a CUDA graph for bucket B=%d V=%d", B, V)
        graph, static_in, out, meta = g
        for dst, src in zip(static_in, inputs):
            if dst is not None:
                dst.copy_(src)
        graph.replay()
        self.replays += 1
        out = out.cpu()
        mark("frame.host")
        return out, meta
