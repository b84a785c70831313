"""Raw-LiDAR branch building blocks: conv + BN + ReLU blocks, SparseBasicBlock3D and RAWSDBlock (S2D /
DOFE encoder-decoder). Parameter names follow the official state_dict layout (``encoder.{i}``, ``decoder.{j}``,
``decoder_norm.{j}``; blocks are ``{0: conv, 1: BN}``)."""
from __future__ import annotations

from functools import partial
from typing import Sequence

import spconv.pytorch as spconv
from torch import nn

BN1D = partial(nn.BatchNorm1d, eps=1e-3, momentum=0.01)


def sparse_block(cin: int, cout: int, kernel_size, indice_key: str, stride=1, padding=0, conv_type: str = "subm",
                 ndim: int = 3) -> spconv.SparseSequential:
    """Sparse conv (no bias) -> BN1d(eps 1e-3, momentum 0.01) -> ReLU. ``conv_type``: subm | spconv | inverseconv."""
    if ndim == 3:
        subm, conv, inv = spconv.SubMConv3d, spconv.SparseConv3d, spconv.SparseInverseConv3d
    elif ndim == 2:
        subm, conv, inv = spconv.SubMConv2d, spconv.SparseConv2d, spconv.SparseInverseConv2d
    else:
        raise ValueError(f"sparse_block: ndim must be 2 or 3, got {ndim}")
    if conv_type == "subm":
        c = subm(cin, cout, kernel_size, bias=False, indice_key=indice_key)
    elif conv_type == "spconv":
        c = conv(cin, cout, kernel_size, stride=stride, padding=padding, bias=False, indice_key=indice_key)
    elif conv_type == "inverseconv":
        c = inv(cin, cout, kernel_size, indice_key=indice_key, bias=False)
    else:
        raise ValueError(f"sparse_block: unknown conv_type {conv_type!r}")
    return spconv.SparseSequential(c, BN1D(cout), nn.ReLU())


class SparseBasicBlock3D(spconv.SparseModule):
    """SubM k3 -> BN -> ReLU -> SubM k3 -> BN -> (+ identity) -> ReLU (both convs share ``indice_key``)."""

    def __init__(self, dim: int, indice_key: str):
        super().__init__()
        self.conv1 = spconv.SubMConv3d(dim, dim, 3, 1, 1, bias=False, indice_key=indice_key)
        self.bn1 = BN1D(dim)
        self.conv2 = spconv.SubMConv3d(dim, dim, 3, 1, 1, bias=False, indice_key=indice_key)
        self.bn2 = BN1D(dim)
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.conv1(x)
        out = out.replace_feature(self.relu(self.bn1(out.features)))
        out = self.conv2(out)
        out = out.replace_feature(self.relu(self.bn2(out.features) + x.features))
        return out


class RAWSDBlock(spconv.SparseModule):
    """Encoder levels 0..L-1 (level 0: ``down_filters[0]`` basic blocks; level i>0: strided conv (key
    ``spconv_<key>_<i>``) + ``down_filters[i]`` basic blocks), then for i = L-1..1 an inverse conv with the same key
    back to level i-1, BN + ReLU, plus the level i-1 encoder features (same index set) and ``decoder_norm`` BN."""

    def __init__(self, dim: int, down_kernel_size: Sequence[int], down_stride: Sequence[int],
                 down_filters: Sequence[int], indice_key: str = "rsd"):
        super().__init__()
        self.encoder = nn.ModuleList([spconv.SparseSequential(
            *[SparseBasicBlock3D(dim, f"{indice_key}_0") for _ in range(down_filters[0])])])
        levels = len(down_stride)
        for i in range(1, levels):
            k = down_kernel_size[i]
            self.encoder.append(spconv.SparseSequential(
                sparse_block(dim, dim, k, f"spconv_{indice_key}_{i}", stride=down_stride[i], padding=k // 2,
                             conv_type="spconv"),
                *[SparseBasicBlock3D(dim, f"{indice_key}_{i}") for _ in range(down_filters[i])]))
        self.decoder = nn.ModuleList()
        self.decoder_norm = nn.ModuleList()
        for i in range(levels - 1, 0, -1):
            self.decoder.append(sparse_block(dim, dim, down_kernel_size[i], f"spconv_{indice_key}_{i}",
                                             conv_type="inverseconv"))
            self.decoder_norm.append(BN1D(dim))

    def forward(self, x):
        feats = []
        for enc in self.encoder:
            x = enc(x)
            feats.append(x)
        x = feats[-1]
        for deconv, norm, skip in zip(self.decoder, self.decoder_norm, feats[:-1][::-1]):
            x = deconv(x)
            x = x.replace_feature(norm(x.features + skip.features))
        return x
