"""BEV: HeightCompression (sparse (B, C, D, H, W) -> dense (B, C*D, H, W), channel = c*D + d) and BaseBEVBackbone,
which writes ``st_features_2d`` (and ``spatial_features_2d``, the OpenPCDet name)."""
from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from .model_config import BEVConfig


class HeightCompression(nn.Module):
    def __init__(self, num_bev_features: int = 256):
        super().__init__()
        self.num_bev_features = num_bev_features

    def forward(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        t = batch["encoded_spconv_tensor"]
        dense = t.dense()
        N, C, D, H, W = dense.shape
        batch["spatial_features"] = dense.view(N, C * D, H, W)
        batch["spatial_features_stride"] = batch["encoded_spconv_tensor_stride"]
        return batch


def _bn2d(c):
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class BaseBEVBackbone(nn.Module):
    def __init__(self, cfg: BEVConfig, input_channels: int):
        super().__init__()
        self.blocks = nn.ModuleList()
        self.deblocks = nn.ModuleList()
        cin = [input_channels, *cfg.num_filters[:-1]]
        for i, n in enumerate(cfg.layer_nums):
            f = cfg.num_filters[i]
            layers = [nn.ZeroPad2d(1), nn.Conv2d(cin[i], f, 3, stride=cfg.layer_strides[i], padding=0, bias=False),
                      _bn2d(f), nn.ReLU()]
            for _ in range(n):
                layers += [nn.Conv2d(f, f, 3, padding=1, bias=False), _bn2d(f), nn.ReLU()]
            self.blocks.append(nn.Sequential(*layers))
            us = cfg.upsample_strides[i]
            uf = cfg.num_upsample_filters[i]
            if us >= 1:
                self.deblocks.append(nn.Sequential(
                    nn.ConvTranspose2d(f, uf, us, stride=us, bias=False), _bn2d(uf), nn.ReLU()))
            else:
                s = int(round(1 / us))
                self.deblocks.append(nn.Sequential(nn.Conv2d(f, uf, s, stride=s, bias=False), _bn2d(uf), nn.ReLU()))
        self.num_bev_features = sum(cfg.num_upsample_filters)

    def forward(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        x = batch["spatial_features"]
        ups = []
        for blk, de in zip(self.blocks, self.deblocks):
            x = blk(x)
            ups.append(de(x))
        x = torch.cat(ups, dim=1) if len(ups) > 1 else ups[0]
        batch["st_features_2d"] = x
        batch["spatial_features_2d"] = x
        return batch
