"""The 3D backbone (VCEConv8x: S2D raw branch + ResVC pseudo branch) on the static-shape sparse engine.

``BackboneEngine(model.backbone_3d)`` reads the eager module's weights once (BatchNorm folded into the convs), then
runs the same stage sequence as ``VCEConv8x.forward`` in eval mode on capacity-padded tensors (``PaddedSparse``):
no host sync, no data-dependent shape, capturable in a CUDA graph. Rebuild it after loading new weights.

Row order. The engine keeps rows sorted by site key, so nothing depends on the order rows were produced in. The one
place where the official model depends on an order is ``image_plane_duplicates: official`` (duplicate image-plane
sites handed to spconv, whose result depends on its internal pair order; measured: spconv's strided convs emit sites
offset-major in first-appearance order, but its duplicate-site SubM result matches neither a first- nor a last-row
rule). The engine therefore implements ``mean`` (our config) and refuses ``official``; the official configuration
runs on the eager path.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..model.backbone3d import VCEConv8x
from ..model.model_config import backbone_engine_unsupported
from ..model.resvc import (IMAGE_GRID_H, IMAGE_GRID_W, ResConvBlock, _affine4, inverse_view_transform,
                           pixels_to_cells, voxel_centers)
from ..model.s2d import RAWSDBlock, SparseBasicBlock3D
from .padded import PaddedSparse
from .sparse import (Affine, FoldedConv, KernelMap, compact_unique, conv_map, inverse_map, keys_to_indices,
                     linear_keys, lookup_sites, masked, subm_map)


@dataclass
class Capacities:
    """Row capacities of the site-creating convolutions, by their ordinal in the engine's fixed conv sequence
    (``fixed``), else ``ratio`` x the input capacity (``dilate_ratio`` for stride-1 k3 dilations, ``down_ratio`` for
    strided convs), never more than K x the input. Every conv's valid count is recorded on the device
    (``BackboneEngine.counts``) and an overflow is counted (``overflow``): the caller re-runs the frame with larger
    capacities (:meth:`grown`). ``calibrated(counts)`` sets capacities from observed counts."""
    dilate_ratio: float = 6.0
    down_ratio: float = 1.0
    min_rows: int = 1024
    fixed: Dict[int, int] = field(default_factory=dict)

    def out_capacity(self, ordinal: int, cap_in: int, kernel, stride) -> int:
        k = int(np.prod(kernel if isinstance(kernel, (tuple, list)) else [kernel] * 3))
        if ordinal in self.fixed:
            return int(min(k * cap_in, self.fixed[ordinal]))
        s = stride if isinstance(stride, (tuple, list)) else (stride,) * 3
        ratio = self.dilate_ratio if all(v == 1 for v in s) else self.down_ratio
        return int(max(self.min_rows, min(k * cap_in, math.ceil(ratio * cap_in))))

    @staticmethod
    def calibrated(counts: Sequence[int], margin: float = 1.5, quantum: int = 1024) -> "Capacities":
        return Capacities(fixed={i: int(math.ceil(c * margin / quantum) * quantum) + quantum
                                 for i, c in enumerate(counts)})


@dataclass
class Sparse:
    """A PaddedSparse flowing through the engine (room for per-row side data)."""
    t: PaddedSparse


def _conv_params(conv) -> Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]:
    return tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.padding)


class _Block(nn.Module):
    """conv + folded BN (+ ReLU)."""

    def __init__(self, seq, relu: bool = True):
        super().__init__()
        self.conv = FoldedConv(seq[0], seq[1])
        self.kernel, self.stride, self.padding = _conv_params(seq[0])
        self.relu = relu

    def forward(self, x: torch.Tensor, kmap: KernelMap) -> torch.Tensor:
        return self.conv(x, kmap, relu=self.relu, mask=True)


class BackboneEngine(nn.Module):
    def __init__(self, backbone: VCEConv8x, capacities: Optional[Capacities] = None):
        super().__init__()
        if backbone.training:
            raise ValueError("BackboneEngine: build it from a module in eval mode (BatchNorm is folded)")
        self.cfg = backbone.cfg
        self.caps = capacities or Capacities()
        self.sparse_shape = list(backbone.sparse_shape)
        why = backbone_engine_unsupported(self.cfg)
        if why:
            raise ValueError(f"BackboneEngine: {why}; use inference.engine: eager")
        self.conv_input = _Block(backbone.conv_input)
        self.conv1 = _Block(backbone.conv1)
        self.levels = nn.ModuleList()
        for lvl in (2, 3, 4):
            seq = getattr(backbone, f"conv{lvl}")
            down = _Block(seq[0])
            rest = list(seq)[1:]
            if rest and isinstance(rest[0], RAWSDBlock):
                self.levels.append(nn.ModuleDict({"down": down, "rsd": _RSD(rest[0])}))
            else:
                self.levels.append(nn.ModuleDict({"down": down, "subm": nn.ModuleList([_Block(r) for r in rest])}))
        self.conv_out = _Block(backbone.conv_out)
        if self.cfg.mm:
            self.conv_input_pseudo = _Block(backbone.conv_input_pseudo)
            self.vir = nn.ModuleList([_ResVC(getattr(backbone, f"vir_conv{i}")) for i in range(1, 5)])
        self.overflow = None
        self.dynamic = False      # True: size every conv output to its exact site count (syncs; calibration only)

    # ------------------------------------------------------------------ helpers
    def _conv(self, x: Sparse, block: _Block) -> Sparse:
        cap = self.caps.out_capacity(len(self._ovf), x.t.capacity, block.kernel, block.stride)
        km, ov = conv_map(x.t, block.kernel, block.stride, block.padding, cap)
        if self.dynamic:   # calibration run: exact capacities (host syncs; never inside a graph)
            n = int(km.out.count) + int(ov)
            km, ov = conv_map(x.t, block.kernel, block.stride, block.padding, max(n, 1))
        self._ovf.append(ov)
        self._counts.append(km.out.count + ov)
        return Sparse(km.out.replace_feature(block(x.t.features, km))), km

    @staticmethod
    def _subm(x: Sparse, block, kmap=None):
        km = kmap or subm_map(x.t, block.kernel)
        return Sparse(x.t.replace_feature(block(x.t.features, km))), km

    def _raw(self, x: Sparse):
        x, km1 = self._subm(x, self.conv_input)
        x1, _ = self._subm(x, self.conv1, km1)
        outs = [x1]
        x = x1
        for lvl in self.levels:
            x, _ = self._conv(x, lvl["down"])
            if "rsd" in lvl:
                x = lvl["rsd"](x, self)
            else:
                km = None
                for b in lvl["subm"]:
                    x, km = self._subm(x, b, km)
            outs.append(x)
        out, _ = self._conv(outs[-1], self.conv_out)
        return outs, out

    # ------------------------------------------------------------------ forward
    def forward(self, raw: PaddedSparse, pseudo: Optional[PaddedSparse], calib: Dict[str, torch.Tensor],
                trans_param: Optional[torch.Tensor]) -> Dict[str, object]:
        """One view. raw / pseudo: VFE features on key-sorted sites. calib: per-sample float32 matrices (B, 4, 3)
        ``m_rect`` and (B, 4, 3) ``p2_t`` (see :func:`calib_tensors`). trans_param: (B, 3+) test view or None.
        Returns x_conv1..4 of both branches and the
        stride-8 ``encoded`` tensor (all ``PaddedSparse``) and ``overflow`` (device tensor)."""
        self._ovf, self._counts = [], []
        outs, enc = self._raw(Sparse(raw))
        res = {"raw": {f"x_conv{i + 1}": o.t for i, o in enumerate(outs)}, "encoded": enc.t}
        if self.cfg.mm and pseudo is not None:
            x = Sparse(pseudo)
            x, _ = self._subm(x, self.conv_input_pseudo)
            mm = {}
            for i, (blk, img_stride) in enumerate(zip(self.vir, (2, 4, 8, 16))):
                x = blk(x, self, calib, img_stride, trans_param)
                mm[f"x_conv{i + 1}"] = x.t
            res["mm"] = mm
        res["overflow"] = torch.stack(self._ovf).sum()
        res["counts"] = torch.stack(self._counts)     # sites each site-creating conv produced (before capping)
        return res


class _RSD(nn.Module):
    """RAWSDBlock: encoder levels (level 0 basic blocks; level i: conv + basic blocks), decoder inverse convs."""

    def __init__(self, m: RAWSDBlock):
        super().__init__()
        self.enc_down = nn.ModuleList()
        self.enc_blocks = nn.ModuleList()
        for i, seq in enumerate(m.encoder):
            mods = list(seq)
            if i > 0:
                self.enc_down.append(_Block(mods[0]))
                mods = mods[1:]
            self.enc_blocks.append(nn.ModuleList([_Basic(b) for b in mods]))
        self.dec = nn.ModuleList([_Block(d) for d in m.decoder])
        self.dec_norm = nn.ModuleList([Affine(n) for n in m.decoder_norm])

    def forward(self, x: Sparse, eng: BackboneEngine) -> Sparse:
        feats = []
        for i, blocks in enumerate(self.enc_blocks):
            if i > 0:
                x, _ = eng._conv(x, self.enc_down[i - 1])
            km = subm_map(x.t, 3) if len(blocks) else None
            for b in blocks:
                x = b(x, km)
            feats.append(x)
        x = feats[-1]
        levels = len(feats)
        for j, (deconv, norm) in enumerate(zip(self.dec, self.dec_norm)):
            fine = feats[levels - 2 - j]
            down = self.enc_down[levels - 2 - j]     # the conv this inverse conv undoes (same indice_key)
            km = inverse_map(x.t, fine.t, down.kernel, down.stride, down.padding)
            y = deconv(x.t.features, km)
            y = masked(norm(y + fine.t.features), fine.t.valid)
            x = Sparse(fine.t.replace_feature(y))
        return x


class _Basic(nn.Module):
    """SparseBasicBlock3D: relu(bn2(conv2(relu(bn1(conv1 x)))) + x), both SubM convs on one kernel map."""

    def __init__(self, m: SparseBasicBlock3D):
        super().__init__()
        self.c1 = FoldedConv(m.conv1, m.bn1)
        self.c2 = FoldedConv(m.conv2, m.bn2)

    def forward(self, x: Sparse, km: KernelMap) -> Sparse:
        h = self.c1(x.t.features, km, relu=True, mask=True)
        y = self.c2(h, km, relu=True, residual=x.t.features, mask=True)
        return Sparse(x.t.replace_feature(y))


class _ResVC(nn.Module):
    """ResConvBlock on the engine: [down] -> d3_conv1 (s2) -> d3_conv2 (+ resnet_layer) -> image-plane 2D SubM x2 ->
    mid_norm -> d3_conv3 -> d3_conv4 (inverse) + x -> output_norm."""

    def __init__(self, m: ResConvBlock):
        super().__init__()
        self.stride = m.stride
        self.down = _Block(m.down_layer) if m.stride > 1 else None
        self.res = _Block(m.resnet_layer) if m.residual else None
        self.d3_1 = _Block(m.d3_conv1)
        self.d3_2 = _Block(m.d3_conv2)
        self.d2_1 = _Block(m.d2_conv1)
        self.d2_2 = _Block(m.d2_conv2)
        self.d3_3 = _Block(m.d3_conv3)
        self.d3_4 = _Block(m.d3_conv4)
        self.mid = Affine(m.mid_norm_fn)
        self.outn = Affine(m.output_norm_fn)
        self.pc_range, self.voxel_size = m.pc_range, m.voxel_size

    def forward(self, x: Sparse, eng: BackboneEngine, calib, img_stride: int, trans_param) -> Sparse:
        if self.down is not None:
            x, _ = eng._conv(x, self.down)
        d3, km1 = eng._conv(x, self.d3_1)
        d3, _ = eng._subm(d3, self.d3_2)
        if self.res is not None:
            # resnet_layer has d3_conv1's geometry (k3 s2 p1): the same output sites, the same kernel map
            r = self.res(x.t.features, km1)
            d3 = Sparse(d3.t.replace_feature(d3.t.features + r))
        uv = image_plane_indices(d3.t, calib, img_stride, trans_param, self.pc_range, self.voxel_size)
        shape = (IMAGE_GRID_W // img_stride, IMAGE_GRID_H // img_stride)
        g = _image_plane_mean(d3.t, uv, shape, self.d2_1, self.d2_2)
        h = masked(self.mid(d3.t.features + g), d3.t.valid)
        d3 = Sparse(d3.t.replace_feature(h))
        d3, _ = eng._subm(d3, self.d3_3)
        km4 = inverse_map(d3.t, x.t, self.d3_1.kernel, self.d3_1.stride, self.d3_1.padding)
        y = self.d3_4.conv(d3.t.features, km4, relu=True)
        y = masked(self.outn(y + x.t.features), x.t.valid)
        return Sparse(x.t.replace_feature(y))


# --------------------------------------------------------------------------------------------------- image plane
def calib_tensors(calibs: Sequence, device) -> Dict[str, torch.Tensor]:
    """Per-sample fixed-order projection matrices: ``m_rect`` (B, 4, 3) = V2C^T @ R0^T and ``p2_t`` (B, 4, 3)."""
    from ..model.resvc import ImageProjector

    m, p = [], []
    for c in calibs:
        proj = ImageProjector(c)
        m.append(proj.rect_matrix())
        p.append(torch.from_numpy(np.asarray(c.P2, dtype=np.float32).T.copy()))
    return {"m_rect": torch.stack(m).to(device), "p2_t": torch.stack(p).to(device)}


def image_plane_indices(t: PaddedSparse, calib: Dict[str, torch.Tensor], stride: int, trans_param, pc_range,
                        voxel_size) -> torch.Tensor:
    """(cap, 3) int32 (b, u', v') of every row (padding rows -> -1); the arithmetic of ``resvc.voxels_to_image_indices``
    with per-row calibration matrices instead of a loop over the batch."""
    idx = t.indices
    valid = t.valid
    b = idx[:, 0].long().clamp_min(0)
    pts = voxel_centers(idx, stride, pc_range, voxel_size)
    if trans_param is not None:
        tp = trans_param.to(pts.device)
        if tp.dim() == 1:
            tp = tp[None]
        if tp.shape[0] == 1:
            pts = inverse_view_transform(pts, tp[0])
        else:   # per-row parameters: the same ops as inverse_view_transform, row-wise
            pts = _inverse_view_rows(pts, tp[b])
    m = calib["m_rect"][b]       # (cap, 4, 3)
    p = calib["p2_t"][b]
    x0, x1, x2 = pts[:, 0], pts[:, 1], pts[:, 2]
    rect = [_affine4(x0, x1, x2, m[:, 0, j], m[:, 1, j], m[:, 2, j], m[:, 3, j]) for j in range(3)]
    img = [_affine4(rect[0], rect[1], rect[2], p[:, 0, j], p[:, 1, j], p[:, 2, j], p[:, 3, j]) for j in range(2)]
    cells = pixels_to_cells(torch.stack([img[0] / rect[2], img[1] / rect[2]], dim=1), stride)
    out = torch.cat([idx[:, :1].int(), cells], dim=1)
    return torch.where(valid[:, None], out, torch.full_like(out, -1))


def _inverse_view_rows(points: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``inverse_view_transform`` with one parameter row per point (the views batched as samples): each row is its
    own batch of one for ``geometry.view_transform.inverse_xyz``."""
    from ..geometry.view_transform import inverse_xyz

    param = param.to(points.dtype)
    if param.shape[1] >= 6:
        points = points - param[:, 3:6]
    return inverse_xyz(points[:, None, :], param[:, 0], param[:, 1], param[:, 2])[:, 0]


def _site_table(uv: torch.Tensor, valid: torch.Tensor, shape, batch_size: int, capacity: int):
    keys = linear_keys(uv, shape, valid)
    table, count, _ = compact_unique(keys, capacity, int(batch_size) * int(shape[0]) * int(shape[1]))
    sites = PaddedSparse(uv.new_zeros((capacity, 0), dtype=torch.float32), keys_to_indices(table, shape), count,
                         tuple(shape), batch_size)
    row_site = lookup_sites(sites, keys)  # (cap,) site row of every voxel row (capacity for padding)
    return sites, row_site


def _image_plane_mean(t: PaddedSparse, uv, shape, c1: _Block, c2: _Block) -> torch.Tensor:
    """Unique sites: scatter-mean voxel features onto sites, two 2D SubM convs, gather back per voxel."""
    cap = t.capacity
    sites, row_site = _site_table(uv, t.valid, shape, t.batch_size, cap)
    feats = t.features.float()      # the scatter-mean accumulates in fp32 whatever the engine's dtype
    acc = feats.new_zeros((cap + 1, feats.shape[1])).index_add_(0, row_site, feats)
    cnt = feats.new_zeros((cap + 1,)).index_add_(0, row_site, torch.ones_like(feats[:, 0]))
    mean = (acc[:cap] / cnt[:cap].clamp_min(1)[:, None]).to(t.features.dtype)
    mean = masked(mean, sites.valid)
    km = subm_map(sites, c1.kernel)
    h = c1(mean, km)
    h = c2(h, km)
    return torch.cat([h, h.new_zeros((1, h.shape[1]))])[row_site]
