"""``EngineBackbone``: the static-shape backbone engine as a drop-in for ``model.backbone_3d`` at inference.

It reads the batch dict that ``VCEConv8x`` reads (VFE features, voxel coordinates, calibrations, test views) and
writes the keys it writes, so the rest of the model is unchanged. On CUDA the engine runs as a captured CUDA graph:
inputs are copied into static capacity-padded buffers and the graph is replayed; it is captured again only when the
capacity bucket (batch size x views, capacities) changes. The test views are batched as samples of one pass.

Stage boundary: the downstream eager modules take spconv tensors, so the outputs are cut to their valid rows with one
device->host copy of the row counts per frame (the only sync). ``engine.frame.FrameGraph`` uses the static part
(``_static``) directly and keeps the padded tensors on the device through BEV, RPN and the RoI head.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Tuple

import spconv.pytorch as spconv
import torch
from torch import nn

from ..model.backbone3d import VCEConv8x
from .backbone import BackboneEngine, Capacities, calib_tensors
from .graphs import capture
from .padded import PaddedSparse
from .sparse import sort_sites

log = logging.getLogger(__name__)


class EngineBackbone(nn.Module):
    def __init__(self, backbone: VCEConv8x, capacities: Optional[Capacities] = None, input_capacity: int = 40000,
                 use_graph: Optional[bool] = None, margin: float = 1.3, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.eager = backbone
        # without explicit capacities the first frame runs un-captured with every conv sized to its exact site count,
        # and the capacities are set from those counts x ``margin``; an overflow later grows them the same way
        self.calibrated = capacities is not None
        self.margin = float(margin)
        self.engine = BackboneEngine(backbone, capacities or Capacities(dilate_ratio=6.0, down_ratio=2.0))
        self.input_capacity = int(input_capacity)
        self.use_graph = use_graph
        self.dtype = dtype       # feature / GEMM dtype inside the engine (bf16 / fp16: tensor-core GEMMs, fp32 accum.)
        self._graphs: Dict[Tuple, Any] = {}
        self.last_overflow = 0
        self.captures = 0
        self._max_counts = []
        self.regrowths = 0
        self.last_padded = None
        self.last_graph_key = None     # the bucket whose graph produced last_padded (None: not a graph replay)

    # ------------------------------------------------------------------ inputs
    def _views(self, batch):
        V = batch["transform_param"].shape[1] if "transform_param" in batch else 1
        return V, ["" if i == 0 else str(i) for i in range(V)]

    def _gather_inputs(self, batch, B, V, sfx):
        """Concatenate the views as samples (b' = v * B + b), pad every modality to V * B * input_capacity rows."""
        out = {}
        for mod in ("", "_mm"):
            if "voxel_features" + mod not in batch:
                continue
            feats, coords = [], []
            for v, s in enumerate(sfx):
                c = batch["voxel_coords" + mod + s].int().clone()
                c[:, 0] += v * B
                feats.append(batch["voxel_features" + mod + s].float())
                coords.append(c)
            f, c = torch.cat(feats), torch.cat(coords)
            cap = self.input_capacity * B * V
            n = f.shape[0]
            if n > cap:
                raise ValueError(f"EngineBackbone: {n} voxels exceed the input capacity {cap}")
            fp = torch.cat([f, f.new_zeros((cap - n, f.shape[1]))])
            cp = torch.cat([c, c.new_full((cap - n, c.shape[1]), -1)])
            out[mod] = (fp, cp, torch.full((), n, dtype=torch.long, device=f.device))
        return out

    def _trans(self, batch, B, V, device):
        if "transform_param" in batch:
            tp = batch["transform_param"].float()                 # (B, V, 3)
            return tp.permute(1, 0, 2).reshape(V * B, -1).to(device)
        if batch.get("aug_param") is not None:
            return batch["aug_param"].float().repeat(V, 1).to(device)
        return None

    # ------------------------------------------------------------------ the static part
    def _static(self, raw_f, raw_c, raw_n, mm_f, mm_c, mm_n, m_rect, p2_t, trans, BV: int):
        shape = self.eager.sparse_shape
        cap = raw_f.shape[0]
        valid = torch.arange(cap, device=raw_f.device) < raw_n
        raw = sort_sites(raw_f.to(self.dtype), raw_c, shape, BV, cap, valid)
        pseudo = None
        if mm_f is not None:
            vm = torch.arange(mm_f.shape[0], device=mm_f.device) < mm_n
            pseudo = sort_sites(mm_f.to(self.dtype), mm_c, shape, BV, mm_f.shape[0], vm)
        return self.engine(raw, pseudo, {"m_rect": m_rect, "p2_t": p2_t}, trans)

    def _run(self, args, BV):
        dev = args[0].device
        use_graph = self.use_graph if self.use_graph is not None else dev.type == "cuda"
        if not self.calibrated:
            # first frame: every conv sized to its exact site count (host syncs), which calibrates the capacities
            self.last_graph_key = None
            self.engine.dynamic = True
            try:
                return self._static(*args, BV)
            finally:
                self.engine.dynamic = False
        if not use_graph:
            self.last_graph_key = None
            return self._static(*args, BV)
        key = (BV,) + tuple(None if a is None else (tuple(a.shape), a.dtype) for a in args)
        g = self._graphs.get(key)
        if g is None:
            static_in = [None if a is None else a.clone() for a in args]
            graph, static_out = capture(lambda: self._static(*static_in, BV))
            g = (graph, static_in, static_out)
            self._graphs[key] = g
            self.captures += 1
            log.info("EngineBackbone: captured a CUDA graph for bucket %s", key[:2])
        self.last_graph_key = key
        graph, static_in, static_out = g
        for dst, src in zip(static_in, args):
            if dst is not None:
                dst.copy_(src)
        graph.replay()
        return static_out

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def forward(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        if self.training:
            raise RuntimeError("EngineBackbone is inference-only; train with the eager backbone")
        V, sfx = self._views(batch)
        for s in sfx:
            if batch["voxel_features" + s].shape[0] == 0:
                raise ValueError("VCEConv8x: no raw LiDAR voxels in the batch (empty or fully out-of-range cloud)")
        B = int(batch["batch_size"])
        BV = B * V
        ins = self._gather_inputs(batch, B, V, sfx)
        raw_f, raw_c, raw_n = ins[""]
        dev = raw_f.device
        has_mm = self.eager.cfg.mm and "_mm" in ins and any(
            batch["voxel_features_mm" + s].shape[0] > 0 for s in sfx)
        mm_f, mm_c, mm_n = ins["_mm"] if has_mm else (None, None, None)
        cal = calib_tensors(list(batch["calib"]) * V, dev)
        trans = self._trans(batch, B, V, dev)
        args = (raw_f, raw_c, raw_n, mm_f, mm_c, mm_n, cal["m_rect"], cal["p2_t"], trans)
        out = self._run(args, BV)
        self.last_padded = out
        counts = self._write(batch, out, B, V, sfx, has_mm)
        for _ in range(8):
            if self.calibrated and not self.last_overflow:
                break
            if not self.recalibrate(counts, self.last_overflow, "EngineBackbone"):
                break
            out = self._static(*args, BV)
            self.last_padded, self.last_graph_key = out, None
            counts = self._write(batch, out, B, V, sfx, has_mm)
        self.last_counts = counts
        return batch

    def recalibrate(self, counts, overflow: int, who: str) -> bool:
        """Capacities from the exact site counts of this run (max with earlier frames) x ``margin``; drops the
        captured graphs. Counts include what did not fit, but downstream convs of an overflowed one saw too few
        sites, so an overflowed frame is re-run until nothing overflows. Returns True when it must be re-run."""
        seen = [max(a, b) for a, b in zip(counts, self._max_counts)] if self._max_counts else list(counts)
        self._max_counts = seen
        self.engine.caps = Capacities.calibrated(seen, margin=self.margin, quantum=4096)
        self._graphs.clear()
        self.calibrated = True
        if not overflow:
            return False
        self.regrowths += 1
        graph = "; its CUDA graph is captured again" if self.graphed() else ""
        log.warning("%s: capacity overflow (%d sites): capacities grown to %s and the frame re-run%s", who, overflow,
                    sorted(self.engine.caps.fixed.values()), graph)
        return True

    def graphed(self) -> bool:
        """Whether this engine replays CUDA graphs (``use_graph``, by default: its weights are on a CUDA device)."""
        if self.use_graph is not None:
            return bool(self.use_graph)
        return any(t.is_cuda for t in self.eager.parameters())

    def _write(self, batch, out, B, V, sfx, has_mm):
        """Cut the padded outputs into per-view spconv tensors (one host copy of all row counts)."""
        tensors = {("raw", k): out["raw"][k] for k in ("x_conv1", "x_conv2", "x_conv3", "x_conv4")}
        tensors[("enc", "")] = out["encoded"]
        if has_mm:
            tensors.update({("mm", k): out["mm"][k] for k in ("x_conv1", "x_conv2", "x_conv3", "x_conv4")})
        # rows are sorted by key and the sample index b' = v * B + b leads the key: view v is a contiguous block
        bounds = {}
        vb = torch.arange(V + 1, device=out["overflow"].device) * B
        for k, t in tensors.items():
            bounds[k] = torch.searchsorted(_row_batch(t), vb)
        nc = out["counts"].numel()
        flat = torch.cat([out["overflow"].view(1), out["counts"].view(-1)] + [b for b in bounds.values()]).tolist()
        self.last_overflow = int(flat[0])
        counts = [int(c) for c in flat[1:1 + nc]]
        pos = 1 + nc
        cuts = {}
        for k in bounds:
            cuts[k] = flat[pos:pos + V + 1]
            pos += V + 1
        strides = {"x_conv1": 1, "x_conv2": 2, "x_conv3": 4, "x_conv4": 8}
        for v, s in enumerate(sfx):
            def sp(key, t: PaddedSparse):
                a, b = cuts[key][v], cuts[key][v + 1]
                idx = t.indices[a:b].clone()
                idx[:, 0] -= v * B
                return spconv.SparseConvTensor(t.features[a:b].float(), idx, list(t.spatial_shape), B)
            batch["encoded_spconv_tensor" + s] = sp(("enc", ""), out["encoded"])
            batch["encoded_spconv_tensor_stride" + s] = 8
            batch["multi_scale_3d_features" + s] = {k: sp(("raw", k), out["raw"][k]) for k in strides}
            batch["multi_scale_3d_strides" + s] = dict(strides)
            if self.eager.cfg.mm:
                batch["encoded_spconv_tensor_stride_mm" + s] = 8
                if has_mm:
                    batch["multi_scale_3d_features_mm" + s] = {k: sp(("mm", k), out["mm"][k]) for k in strides}
                else:
                    batch["multi_scale_3d_features_mm" + s] = self.eager._empty_pseudo(
                        batch["voxel_features" + s], B)
        return counts


def _row_batch(t: PaddedSparse) -> torch.Tensor:
    """Sample index of every row, padding rows -> a value above every sample (keeps the column sorted)."""
    b = t.indices[:, 0].long()
    return torch.where(b >= 0, b, torch.full_like(b, 1 << 40))


def use_engine(model: nn.Module, capacities: Optional[Capacities] = None, use_graph: Optional[bool] = None,
               input_capacity: Optional[int] = None, **kw) -> EngineBackbone:
    """Swap ``model.backbone_3d`` for an ``EngineBackbone`` (eval only; the eager module is kept inside it)."""
    bb = model.backbone_3d
    if isinstance(bb, EngineBackbone):
        return bb
    cap = input_capacity or model.cfg.max_voxels(False)
    eng = EngineBackbone(bb, capacities, cap, use_graph, **kw).to(next(bb.parameters()).device).eval()
    model.backbone_3d = eng
    return eng
