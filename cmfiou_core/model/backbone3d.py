"""VCEConv8x: raw S2D branch (conv_input, conv1..4 with RAWSDBlocks, conv_out) and the pseudo ResVC branch
(conv_input_pseudo, vir_conv1..4). No feature exchange between the branches.

Outputs (batch-dict keys, view suffix ``''``, ``'1'``, ``'2'``): ``multi_scale_3d_features{sfx}`` (x_conv1..4),
``encoded_spconv_tensor{sfx}`` (stride 8, after conv_out), ``multi_scale_3d_features_mm{sfx}``.

Eval-mode raw-branch view batching (``view_batching``):
- ``wide`` (official): all views in one sparse tensor of x extent 4*W, view i at x offset i*W; each view is cut back
  out with the strict test ``i*W' < x < (i+1)*W'`` (so x == i*W' is dropped) at x_conv3, x_conv4 and out;
  x_conv1/x_conv2 are None. With one view this equals the official single-view test path bit for bit.
- ``separate``: one sparse tensor per view with the normal shape, nothing cut, x_conv1..4 all kept. On the dense
  reference frame the two give identical results (no voxel at x == 0 or near the far x edge); in general they can
  differ at the x == 0 plane and, for the wide path, where a view's voxels reach the next view's x range.
Training always runs each view separately (as the official code).
"""
from __future__ import annotations

from typing import Any, Dict, List

import spconv.pytorch as spconv
import torch
from torch import nn

from .model_config import Backbone3DConfig
from .resvc import ResConvBlock
from .s2d import BN1D, RAWSDBlock, sparse_block


def _voxel_discard(t: spconv.SparseConvTensor, rate: float) -> spconv.SparseConvTensor:
    n = t.features.shape[0]
    keep = torch.randperm(n, device=t.features.device)[: int(n * (1 - rate))]
    out = t.replace_feature(t.features[keep])
    out.indices = t.indices[keep]
    return out


class VCEConv8x(nn.Module):
    def __init__(self, cfg: Backbone3DConfig, input_channels: int, sparse_shape: List[int], pc_range, voxel_size):
        super().__init__()
        self.cfg = cfg
        self.sparse_shape = list(sparse_shape)
        nf = cfg.num_filters
        self.conv_input = spconv.SparseSequential(
            spconv.SubMConv3d(input_channels, nf[0], 3, padding=1, bias=False, indice_key="subm1"), BN1D(nf[0]),
            nn.ReLU())
        self.conv_input_pseudo = spconv.SparseSequential(
            spconv.SubMConv3d(input_channels, nf[0], 3, padding=1, bias=False, indice_key="subm1"), BN1D(nf[0]),
            nn.ReLU())
        self.conv1 = sparse_block(nf[0], nf[0], 3, "subm1", padding=1)
        pads = [1, 1, (0, 1, 1)]
        for lvl in (2, 3, 4):
            cin, cout = nf[lvl - 2], nf[lvl - 1]
            down = sparse_block(cin, cout, 3, f"spconv{lvl}", stride=2, padding=pads[lvl - 2], conv_type="spconv")
            if cfg.sd_branch:
                rest = [RAWSDBlock(cout, cfg.down_kernel_size, cfg.down_stride, cfg.down_filters, f"rsd{lvl}")]
            else:
                rest = [sparse_block(cout, cout, 3, f"subm{lvl}", padding=1) for _ in range(2)]
            setattr(self, f"conv{lvl}", spconv.SparseSequential(down, *rest))
        self.conv_out = spconv.SparseSequential(
            spconv.SparseConv3d(nf[3], cfg.out_features, (3, 1, 1), stride=(2, 1, 1), padding=0, bias=False,
                                indice_key="spconv_down2"), BN1D(cfg.out_features), nn.ReLU())
        if cfg.mm:
            kw = dict(res_enable=cfg.resvc_branch, pc_range=pc_range, voxel_size=voxel_size,
                      image_plane_duplicates=cfg.image_plane_duplicates)
            self.vir_conv1 = ResConvBlock(nf[0], nf[0], stride=1, indice_key="vir1", **kw)
            self.vir_conv2 = ResConvBlock(nf[0], nf[1], stride=2, indice_key="vir2", **kw)
            self.vir_conv3 = ResConvBlock(nf[1], nf[2], stride=2, indice_key="vir3", **kw)
            self.vir_conv4 = ResConvBlock(nf[2], nf[3], stride=2, padding=(0, 1, 1), indice_key="vir4", **kw)
        self.num_point_features = cfg.out_features
        self.multi_scale_channels = {"x_conv1": nf[0], "x_conv2": nf[1], "x_conv3": nf[2], "x_conv4": nf[3]}

    # ------------------------------------------------------------------ raw branch
    def _raw(self, feats, coords, shape, batch_size):
        x = spconv.SparseConvTensor(features=feats, indices=coords.int(), spatial_shape=shape, batch_size=batch_size)
        x = self.conv_input(x)
        x1 = self.conv1(x)
        x2 = self.conv2(x1)
        x3 = self.conv3(x2)
        x4 = self.conv4(x3)
        return x1, x2, x3, x4, self.conv_out(x4)

    @staticmethod
    def _cut_view(t: spconv.SparseConvTensor, i: int, batch_size: int, num_slots: int = 4):
        w = t.spatial_shape[2] // num_slots
        begin, end = i * w, (i + 1) * w
        xs = t.indices[:, 3]
        m = (begin < xs) & (xs < end)
        idx = t.indices[m].clone()
        idx[:, 3] -= begin
        return spconv.SparseConvTensor(features=t.features[m], indices=idx.int(),
                                       spatial_shape=[t.spatial_shape[0], t.spatial_shape[1], w], batch_size=batch_size)

    def forward(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        num_views = batch["transform_param"].shape[1] if "transform_param" in batch else 1
        for i in range(num_views):
            if batch["voxel_features" + ("" if i == 0 else str(i))].shape[0] == 0:
                raise ValueError("VCEConv8x: no raw LiDAR voxels in the batch (empty or fully out-of-range cloud)")
        B = int(batch["batch_size"])
        sfx = ["" if i == 0 else str(i) for i in range(num_views)]
        strides = {"x_conv1": 1, "x_conv2": 2, "x_conv3": 4, "x_conv4": 8}
        if self.training or self.cfg.view_batching == "separate":
            for s in sfx:
                x1, x2, x3, x4, out = self._raw(batch["voxel_features" + s], batch["voxel_coords" + s],
                                                self.sparse_shape, B)
                batch["encoded_spconv_tensor" + s] = out
                batch["encoded_spconv_tensor_stride" + s] = 8
                batch["multi_scale_3d_features" + s] = {"x_conv1": x1, "x_conv2": x2, "x_conv3": x3, "x_conv4": x4}
                batch["multi_scale_3d_strides" + s] = dict(strides)
        else:
            if num_views > 4:
                raise ValueError("VCEConv8x: the wide view batching holds at most 4 views")
            W = self.sparse_shape[2]
            feats, coords = [], []
            for i, s in enumerate(sfx):
                feats.append(batch["voxel_features" + s])
                c = batch["voxel_coords" + s].clone()
                c[:, 3] += i * W
                coords.append(c)
            shape = [self.sparse_shape[0], self.sparse_shape[1], W * 4]
            _, _, x3, x4, out = self._raw(torch.cat(feats, 0), torch.cat(coords, 0), shape, B)
            for i, s in enumerate(sfx):
                batch["encoded_spconv_tensor" + s] = self._cut_view(out, i, B)
                batch["encoded_spconv_tensor_stride" + s] = 8
                batch["multi_scale_3d_features" + s] = {"x_conv1": None, "x_conv2": None,
                                                        "x_conv3": self._cut_view(x3, i, B),
                                                        "x_conv4": self._cut_view(x4, i, B)}
                batch["multi_scale_3d_strides" + s] = dict(strides)
        if self.cfg.mm:
            self._pseudo(batch, sfx, B)
        return batch

    # ------------------------------------------------------------------ pseudo branch
    def _level_shapes(self):
        z, y, x = self.sparse_shape
        shapes = [[z, y, x]]
        for pz in (1, 1, 0):   # vir_conv2..4 down layers: k3 s2, padding (1,1,1), (1,1,1), (0,1,1)
            z, y, x = (z + 2 * pz - 3) // 2 + 1, (y - 1) // 2 + 1, (x - 1) // 2 + 1
            shapes.append([z, y, x])
        return shapes

    def _empty_pseudo(self, ref: torch.Tensor, B: int):
        """No pseudo voxels in the whole batch (LiDAR-only frame): empty tensors with the right shapes (spconv
        cannot convolve an empty tensor)."""
        c = self.cfg.num_filters
        return {f"x_conv{i + 1}": spconv.SparseConvTensor(
            features=ref.new_zeros((0, c[i])), indices=torch.zeros((0, 4), dtype=torch.int32, device=ref.device),
            spatial_shape=shp, batch_size=B) for i, shp in enumerate(self._level_shapes())}

    def _pseudo(self, batch, sfx, B):
        calibs = batch["calib"]
        rate = self.cfg.layer_discard_rate if self.training else 0.0
        for i, s in enumerate(sfx):
            if batch["voxel_features_mm" + s].shape[0] == 0:
                batch["encoded_spconv_tensor_stride_mm" + s] = 8
                batch["multi_scale_3d_features_mm" + s] = self._empty_pseudo(batch["voxel_features_mm" + s], B)
                continue
            if "transform_param" in batch:
                tp = batch["transform_param"][:, i, :]
            else:
                tp = batch.get("aug_param", None)
            x = spconv.SparseConvTensor(features=batch["voxel_features_mm" + s],
                                        indices=batch["voxel_coords_mm" + s].int(), spatial_shape=self.sparse_shape,
                                        batch_size=B)
            x = self.conv_input_pseudo(x)
            if rate > 0:
                x = _voxel_discard(x, rate)
            n1 = self.vir_conv1(x, B, calibs, 2, tp)
            n1d = _voxel_discard(n1, rate) if rate > 0 else n1
            n2 = self.vir_conv2(n1d, B, calibs, 4, tp)
            n2d = _voxel_discard(n2, rate) if rate > 0 else n2
            n3 = self.vir_conv3(n2d, B, calibs, 8, tp)
            n3d = _voxel_discard(n3, rate) if rate > 0 else n3
            n4 = self.vir_conv4(n3d, B, calibs, 16, tp)
            batch["encoded_spconv_tensor_stride_mm" + s] = 8
            batch["multi_scale_3d_features_mm" + s] = {"x_conv1": n1, "x_conv2": n2, "x_conv3": n3, "x_conv4": n4}
