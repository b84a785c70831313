"""The [rot, flip, scale] view / augmentation transform (OpenPCDet ``X_TRANS`` order): rotate about +z by ``rot``,
negate y when ``flip``, scale by ``scale``; and its exact inverse. One implementation for points (test views in
``detector.prepare_batch``, ResVC's image-plane projection), boxes (the RoI head's views) and the training
augmentation's world transform (``data.augment.world_transform``, whose ``aug_param`` the model inverts here).

``flip`` is 0 or 1 (a config value or an augmentation record); anything above 0.5 counts as a flip.
"""
from __future__ import annotations

import torch

from .boxes import rotate_points_along_z


def forward_xyz(xyz: torch.Tensor, rot: torch.Tensor, flip: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(B, N, 3) xyz in the original frame -> the view frame; rot, flip, scale (B,)."""
    xyz = rotate_points_along_z(xyz, rot)
    f = flip[:, None] > 0.5
    y = torch.where(f, -xyz[..., 1], xyz[..., 1])
    return torch.stack([xyz[..., 0], y, xyz[..., 2]], dim=-1) * scale[:, None, None]


def inverse_xyz(xyz: torch.Tensor, rot: torch.Tensor, flip: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Exact inverse of :func:`forward_xyz`: un-scale, un-flip, rotate by -rot."""
    xyz = xyz / scale[:, None, None]
    f = flip[:, None] > 0.5
    y = torch.where(f, -xyz[..., 1], xyz[..., 1])
    return rotate_points_along_z(torch.stack([xyz[..., 0], y, xyz[..., 2]], dim=-1), -rot)


def view_transform_points(points: torch.Tensor, param) -> torch.Tensor:
    """Apply one [rot, flip, scale] view to (N, 3+C) points; extra columns pass through."""
    param = torch.as_tensor(param, dtype=points.dtype, device=points.device)
    pts = forward_xyz(points[None, :, :3], param[0:1], param[1:2], param[2:3])[0]
    return torch.cat([pts, points[:, 3:]], dim=1)


def inverse_view_transform(points: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Undo a [rot, flip, scale] view/augmentation on (N, 3) points (``X_TRANS.backward_with_param`` order).

    A 6-element ``[rot, flip, scale, tx, ty, tz]`` also undoes the global shift that training's ``random_local_trans``
    applies after the world transforms (first subtracted). The official code does not record that shift, so its
    image-plane projection is off by up to 0.5 m during training but exact at test time; ours is exact in both."""
    param = param.to(points.dtype)
    if param.shape[0] >= 6:
        points = points - param[3:6]
    return inverse_xyz(points[None], param[0:1], param[1:2], param[2:3])[0]


def x_trans_forward(boxes: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Boxes (B, N, 7+) in the original frame -> view frame; param (B, 3) [rot, flip, scale]."""
    rot, flip, scale = param[:, 0], param[:, 1], param[:, 2]
    xyz = forward_xyz(boxes[:, :, 0:3], rot, flip, scale)
    h = boxes[:, :, 6] + rot[:, None]
    h = torch.where(flip[:, None] > 0.5, -h, h)
    dims = boxes[:, :, 3:6] * scale[:, None, None]
    return torch.cat([xyz, dims, h[..., None], boxes[:, :, 7:]], dim=-1)


def x_trans_backward(boxes: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`x_trans_forward`."""
    rot, flip, scale = param[:, 0], param[:, 1], param[:, 2]
    xyz = inverse_xyz(boxes[:, :, 0:3], rot, flip, scale)
    dims = boxes[:, :, 3:6] / scale[:, None, None]
    h = torch.where(flip[:, None] > 0.5, -boxes[:, :, 6], boxes[:, :, 6])
    return torch.cat([xyz, dims, (h - rot[:, None])[..., None], boxes[:, :, 7:]], dim=-1)
