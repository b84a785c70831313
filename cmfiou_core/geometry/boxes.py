"""Box geometry: period wrapping, rotation about z, corners, LiDAR <-> KITTI camera boxes, image boxes, alpha.

LiDAR boxes: ``[x, y, z, dx, dy, dz, heading]`` (centre; OpenPCDet). KITTI camera boxes: ``[x, y, z, l, h, w, ry]``
in the rectified camera frame with (x, y, z) the *bottom* centre (KITTI label convention; camera y points down).

Every function accepts torch tensors (computing on their device/dtype) or numpy arrays (returned as numpy of the same
dtype); semantics follow OpenPCDet ``pcdet/utils/{common_utils,box_utils}.py``.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import numpy as np
import torch

from ..calib import Calibration


def _numpy_compat(fn):
    """Run ``fn`` on torch tensors; numpy inputs are converted and the outputs converted back."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        is_np = any(isinstance(a, np.ndarray) for a in args)
        if not is_np:
            return fn(*args, **kwargs)
        conv = [torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a for a in args]
        out = fn(*conv, **kwargs)
        if isinstance(out, tuple):
            return tuple(o.numpy() if isinstance(o, torch.Tensor) else o for o in out)
        return out.numpy() if isinstance(out, torch.Tensor) else out

    return wrapper


@_numpy_compat
def limit_period(val, offset: float = 0.5, period: float = math.pi):
    """``val - floor(val / period + offset) * period``: wraps into [-offset*period, (1-offset)*period)."""
    return val - torch.floor(val / period + offset) * period


@_numpy_compat
def rotate_points_along_z(points: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate (B, N, 3+C) points about +z by (B,) angles (counter-clockwise, radians). Extra channels pass through.

    Same op sequence as OpenPCDet (``points @ [[c, s, 0], [-s, c, 0], [0, 0, 1]]``) for bit-compatible results. As
    OpenPCDet, the rotation matrix is rounded to float32 -- except when both points and angles are float64, where it
    stays float64 (the numpy data path, e.g. the synthetic scene generator, relies on full float64 corners).
    """
    cosa = torch.cos(angle)
    sina = torch.sin(angle)
    zeros = angle.new_zeros(points.shape[0])
    ones = angle.new_ones(points.shape[0])
    rot_matrix = torch.stack((cosa, sina, zeros, -sina, cosa, zeros, zeros, zeros, ones), dim=1).view(-1, 3, 3)
    if points.dtype != torch.float64:
        rot_matrix = rot_matrix.float()
    rot_matrix = rot_matrix.to(points.dtype)
    points_rot = torch.matmul(points[:, :, 0:3], rot_matrix)
    return torch.cat((points_rot, points[:, :, 3:]), dim=-1)


_CORNER_TEMPLATE = ((1, 1, -1), (1, -1, -1), (-1, -1, -1), (-1, 1, -1),
                    (1, 1, 1), (1, -1, 1), (-1, -1, 1), (-1, 1, 1))


@_numpy_compat
def boxes_to_corners_3d(boxes3d: torch.Tensor) -> torch.Tensor:
    """(N, 7+C) LiDAR boxes -> (N, 8, 3) corners. Order: bottom face (z-) 0..3, top face 4..7, starting at (+x, +y).

          7 -------- 4
         /|         /|
        6 -------- 5 .
        | |        | |
        . 3 -------- 0
        |/         |/
        2 -------- 1
    """
    template = boxes3d.new_tensor(_CORNER_TEMPLATE) / 2
    corners3d = boxes3d[:, None, 3:6].repeat(1, 8, 1) * template[None, :, :]
    corners3d = rotate_points_along_z(corners3d.view(-1, 8, 3), boxes3d[:, 6]).view(-1, 8, 3)
    corners3d = corners3d + boxes3d[:, None, 0:3]
    return corners3d


@_numpy_compat
def boxes_bev_corners(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 7+C) boxes -> (..., 4, 2) BEV corners, counter-clockwise: (+dx,+dy), (-dx,+dy), (-dx,-dy), (+dx,-dy)."""
    cosa, sina = torch.cos(boxes[..., 6]), torch.sin(boxes[..., 6])
    hx, hy = boxes[..., 3] / 2, boxes[..., 4] / 2
    sx = boxes.new_tensor([1.0, -1.0, -1.0, 1.0])
    sy = boxes.new_tensor([1.0, 1.0, -1.0, -1.0])
    lx = hx[..., None] * sx
    ly = hy[..., None] * sy
    x = lx * cosa[..., None] - ly * sina[..., None] + boxes[..., 0:1]
    y = lx * sina[..., None] + ly * cosa[..., None] + boxes[..., 1:2]
    return torch.stack([x, y], dim=-1)


def boxes3d_lidar_to_kitti_camera(boxes3d_lidar, calib: Calibration):
    """(N, 7) LiDAR boxes -> (N, 7) KITTI camera boxes ``[x, y, z, l, h, w, ry]`` (bottom centre, ry = -heading - pi/2).

    Works on numpy or torch (device/dtype of the input). Extra columns beyond 7 are dropped.
    """
    if isinstance(boxes3d_lidar, np.ndarray):
        return boxes3d_lidar_to_kitti_camera(torch.from_numpy(np.ascontiguousarray(boxes3d_lidar)), calib).numpy()
    xyz_lidar = boxes3d_lidar[:, 0:3].clone()
    l, w, h = boxes3d_lidar[:, 3:4], boxes3d_lidar[:, 4:5], boxes3d_lidar[:, 5:6]
    r = boxes3d_lidar[:, 6:7]
    xyz_lidar[:, 2] = xyz_lidar[:, 2] - h[:, 0] / 2
    xyz_cam = calib.lidar_to_rect(xyz_lidar)
    r = -r - math.pi / 2
    return torch.cat([xyz_cam, l, h, w, r], dim=-1)


def boxes3d_kitti_camera_to_lidar(boxes3d_camera, calib: Calibration):
    """(N, 7) KITTI camera boxes ``[x, y, z, l, h, w, ry]`` -> (N, 7) LiDAR boxes (inverse of the above)."""
    if isinstance(boxes3d_camera, np.ndarray):
        return boxes3d_kitti_camera_to_lidar(torch.from_numpy(np.ascontiguousarray(boxes3d_camera)), calib).numpy()
    xyz_camera = boxes3d_camera[:, 0:3]
    l, h, w, r = boxes3d_camera[:, 3:4], boxes3d_camera[:, 4:5], boxes3d_camera[:, 5:6], boxes3d_camera[:, 6:7]
    xyz_lidar = calib.rect_to_lidar(xyz_camera).clone()
    xyz_lidar[:, 2] = xyz_lidar[:, 2] + h[:, 0] / 2
    return torch.cat([xyz_lidar, l, w, h, -(r + math.pi / 2)], dim=-1)


@_numpy_compat
def boxes3d_to_corners3d_kitti_camera(boxes3d: torch.Tensor, bottom_center: bool = True) -> torch.Tensor:
    """(N, 7) KITTI camera boxes -> (N, 8, 3) rect-frame corners (OpenPCDet order)."""
    l, h, w, ry = boxes3d[:, 3], boxes3d[:, 4], boxes3d[:, 5], boxes3d[:, 6]
    zero = torch.zeros_like(l)
    x_c = torch.stack([l / 2, l / 2, -l / 2, -l / 2, l / 2, l / 2, -l / 2, -l / 2], dim=1)
    z_c = torch.stack([w / 2, -w / 2, -w / 2, w / 2, w / 2, -w / 2, -w / 2, w / 2], dim=1)
    if bottom_center:
        y_c = torch.stack([zero, zero, zero, zero, -h, -h, -h, -h], dim=1)
    else:
        y_c = torch.stack([h / 2, h / 2, h / 2, h / 2, -h / 2, -h / 2, -h / 2, -h / 2], dim=1)
    c, s = torch.cos(ry), torch.sin(ry)
    # R = [[c, 0, -s], [0, 1, 0], [s, 0, c]]; corners @ R
    x = x_c * c[:, None] + z_c * s[:, None]
    z = -x_c * s[:, None] + z_c * c[:, None]
    return torch.stack([x + boxes3d[:, None, 0], y_c + boxes3d[:, None, 1], z + boxes3d[:, None, 2]], dim=-1)


def boxes3d_kitti_camera_to_imageboxes(boxes3d_camera, calib: Calibration,
                                       image_shape: Optional[Sequence[int]] = None):
    """(N, 7) KITTI camera boxes -> (N, 4) image boxes ``[x1, y1, x2, y2]`` = min/max of the 8 projected corners.

    ``image_shape`` = (H, W): clip x to [0, W-1] and y to [0, H-1] (OpenPCDet).
    """
    if isinstance(boxes3d_camera, np.ndarray):
        return boxes3d_kitti_camera_to_imageboxes(torch.from_numpy(np.ascontiguousarray(boxes3d_camera)), calib,
                                                  image_shape).numpy()
    corners3d = boxes3d_to_corners3d_kitti_camera(boxes3d_camera)
    pts_img, _ = calib.rect_to_img(corners3d.reshape(-1, 3))
    corners_in_image = pts_img.reshape(-1, 8, 2)
    min_uv = corners_in_image.min(dim=1).values
    max_uv = corners_in_image.max(dim=1).values
    boxes2d = torch.cat([min_uv, max_uv], dim=1)
    if image_shape is not None:
        H, W = int(image_shape[0]), int(image_shape[1])
        boxes2d[:, 0] = boxes2d[:, 0].clamp(0, W - 1)
        boxes2d[:, 1] = boxes2d[:, 1].clamp(0, H - 1)
        boxes2d[:, 2] = boxes2d[:, 2].clamp(0, W - 1)
        boxes2d[:, 3] = boxes2d[:, 3].clamp(0, H - 1)
    return boxes2d


def pad_small_image_boxes(boxes2d, min_height: float = 25.0, pad: float = 2.0):
    """CMF-IOU ``generate_prediction_dicts`` tweak: boxes with height < 25 px get 2 px added to the bottom."""
    if isinstance(boxes2d, np.ndarray):
        out = boxes2d.copy()
        small = (out[:, 3] - out[:, 1]) < min_height
        out[small, 3] += pad
        return out
    out = boxes2d.clone()
    small = (out[:, 3] - out[:, 1]) < min_height
    out[:, 3] = torch.where(small, out[:, 3] + pad, out[:, 3])
    return out


@_numpy_compat
def kitti_alpha(boxes3d_lidar: torch.Tensor, boxes3d_camera: torch.Tensor) -> torch.Tensor:
    """Observation angle ``alpha = -atan2(-y_lidar, x_lidar) + ry`` (OpenPCDet ``generate_prediction_dicts``)."""
    return -torch.atan2(-boxes3d_lidar[:, 1], boxes3d_lidar[:, 0]) + boxes3d_camera[:, 6]


def lidar_boxes_to_kitti(boxes3d_lidar, calib: Calibration, image_shape: Optional[Sequence[int]] = None,
                         pad_small: bool = True):
    """Convenience: LiDAR boxes -> dict(camera boxes (N,7), bbox (N,4), alpha (N,), location, dimensions (l,h,w), ry).

    ``dimensions`` follow OpenPCDet's ``pred_dict['dimensions'] = boxes_camera[:, 3:6]`` = (l, h, w); the KITTI text
    writer prints them as ``h w l``. ``pad_small`` applies the CMF-IOU < 25 px tweak.
    """
    cam = boxes3d_lidar_to_kitti_camera(boxes3d_lidar, calib)
    bbox = boxes3d_kitti_camera_to_imageboxes(cam, calib, image_shape)
    if pad_small:
        bbox = pad_small_image_boxes(bbox)
    alpha = kitti_alpha(boxes3d_lidar, cam)
    return {"boxes_camera": cam, "bbox": bbox, "alpha": alpha, "location": cam[:, 0:3],
            "dimensions": cam[:, 3:6], "rotation_y": cam[:, 6]}
