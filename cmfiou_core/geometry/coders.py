"""Box coders (OpenPCDet ``ResidualCoder`` semantics) and the sin-difference helper.

Boxes are ``[x, y, z, dx, dy, dz, heading, *extra]`` (LiDAR frame, centred). Encoding of ``boxes`` against
``anchors`` (both (..., 7 + extra)):

    diagonal = sqrt(dxa^2 + dya^2)
    xt = (xg - xa) / diagonal,  yt = (yg - ya) / diagonal,  zt = (zg - za) / dza
    dxt = log(dxg / dxa), dyt = log(dyg / dya), dzt = log(dzg / dza)
    rt = rg - ra                       (or [cos rg - cos ra, sin rg - sin ra] with encode_angle_by_sin)
    extra_t = extra_g - extra_a

All sizes are clamped to >= 1e-5 before encoding (as OpenPCDet). The operation order of ``decode`` follows the
reference exactly (``xt * diagonal + xa`` etc.), so decoded boxes are bit-identical to the official code in fp32.
"""
from __future__ import annotations

from typing import Tuple

import torch


class ResidualCoder:
    """Residual box coder. ``code_size`` = 7 + extra (+1 with ``encode_angle_by_sin``)."""

    def __init__(self, code_size: int = 7, encode_angle_by_sin: bool = False):
        if code_size < 7:
            raise ValueError(f"ResidualCoder: code_size must be >= 7, got {code_size}")
        self.code_size = int(code_size)
        self.encode_angle_by_sin = bool(encode_angle_by_sin)
        if self.encode_angle_by_sin:
            self.code_size += 1

    def encode_torch(self, boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """(..., 7+C) boxes, (..., 7+C) anchors -> (..., code_size) residual targets."""
        anchors = anchors.clone()
        boxes = boxes.clone()
        anchors[..., 3:6] = torch.clamp_min(anchors[..., 3:6], 1e-5)
        boxes[..., 3:6] = torch.clamp_min(boxes[..., 3:6], 1e-5)
        xa, ya, za, dxa, dya, dza, ra, *cas = torch.split(anchors, 1, dim=-1)
        xg, yg, zg, dxg, dyg, dzg, rg, *cgs = torch.split(boxes, 1, dim=-1)
        diagonal = torch.sqrt(dxa ** 2 + dya ** 2)
        xt = (xg - xa) / diagonal
        yt = (yg - ya) / diagonal
        zt = (zg - za) / dza
        dxt = torch.log(dxg / dxa)
        dyt = torch.log(dyg / dya)
        dzt = torch.log(dzg / dza)
        if self.encode_angle_by_sin:
            rts = [torch.cos(rg) - torch.cos(ra), torch.sin(rg) - torch.sin(ra)]
        else:
            rts = [rg - ra]
        cts = [g - a for g, a in zip(cgs, cas)]
        return torch.cat([xt, yt, zt, dxt, dyt, dzt, *rts, *cts], dim=-1)

    def decode_torch(self, box_encodings: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """(..., code_size) residuals, (..., 7+C) anchors -> (..., 7+C) boxes."""
        xa, ya, za, dxa, dya, dza, ra, *cas = torch.split(anchors, 1, dim=-1)
        if not self.encode_angle_by_sin:
            xt, yt, zt, dxt, dyt, dzt, rt, *cts = torch.split(box_encodings, 1, dim=-1)
        else:
            xt, yt, zt, dxt, dyt, dzt, cost, sint, *cts = torch.split(box_encodings, 1, dim=-1)
        diagonal = torch.sqrt(dxa ** 2 + dya ** 2)
        xg = xt * diagonal + xa
        yg = yt * diagonal + ya
        zg = zt * dza + za
        dxg = torch.exp(dxt) * dxa
        dyg = torch.exp(dyt) * dya
        dzg = torch.exp(dzt) * dza
        if self.encode_angle_by_sin:
            rg_cos = cost + torch.cos(ra)
            rg_sin = sint + torch.sin(ra)
            rg = torch.atan2(rg_sin, rg_cos)
        else:
            rg = rt + ra
        cgs = [t + a for t, a in zip(cts, cas)]
        return torch.cat([xg, yg, zg, dxg, dyg, dzg, rg, *cgs], dim=-1)

    # OpenPCDet-style aliases
    encode = encode_torch
    decode = decode_torch


def add_sin_difference(boxes1: torch.Tensor, boxes2: torch.Tensor, dim: int = 6) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sin-difference trick for the angle regression loss (SECOND / OpenPCDet).

    Replaces channel ``dim`` of the predictions by ``sin(a) cos(b)`` and of the targets by ``cos(a) sin(b)`` so that
    ``smooth_l1(p, t)`` on that channel penalises ``sin(a - b)``. Returns new tensors (inputs unchanged).
    """
    if dim < 0 or dim >= boxes1.shape[-1] or boxes1.shape[-1] != boxes2.shape[-1]:
        raise ValueError(f"add_sin_difference: bad dim {dim} for shapes {tuple(boxes1.shape)} / {tuple(boxes2.shape)}")
    rad_pred = torch.sin(boxes1[..., dim:dim + 1]) * torch.cos(boxes2[..., dim:dim + 1])
    rad_tg = torch.cos(boxes1[..., dim:dim + 1]) * torch.sin(boxes2[..., dim:dim + 1])
    boxes1 = torch.cat([boxes1[..., :dim], rad_pred, boxes1[..., dim + 1:]], dim=-1)
    boxes2 = torch.cat([boxes2[..., :dim], rad_tg, boxes2[..., dim + 1:]], dim=-1)
    return boxes1, boxes2
