"""Rotations: quaternion (x, y, z, w; the ROS/TF order) <-> 3x3 matrix, yaw about +z <-> quaternion, and the
nearest rotation of a matrix.

The one implementation used by the calibration (``calib.transform_from_tf``), the ROS conversions
(``cmfiou_ros.convert``) and the bag writer / ROS-calibration model of the evaluation (``eval.bag_io``).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Type

import numpy as np


def quaternion_to_matrix(q_xyzw, unit_tol: Optional[float] = None, error: Type[Exception] = ValueError
                         ) -> np.ndarray:
    """(x, y, z, w) -> 3x3 rotation matrix (float64) of the normalised quaternion.

    Raises ``error`` for anything but 4 finite numbers with a non-zero norm, and, with ``unit_tol``, for a norm
    further than ``unit_tol`` from 1 (a TF rotation is a unit quaternion; a far-off norm means a wrong field order or
    garbage)."""
    q = np.asarray(q_xyzw, dtype=np.float64).reshape(-1)
    if q.size != 4 or not np.all(np.isfinite(q)):
        raise error(f"quaternion must be 4 finite numbers (x, y, z, w), got {q_xyzw!r}")
    n = float(np.linalg.norm(q))
    if unit_tol is not None and abs(n - 1.0) > unit_tol:
        raise error(f"quaternion {q.tolist()} is not unit length (|q| = {n:.6g}); TF rotations are unit "
                    "quaternions in (x, y, z, w) order")
    if n < 1e-9:
        raise error(f"quaternion {q.tolist()} has zero or non-finite norm")
    x, y, z, w = q / n
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def matrix_to_quaternion(R) -> Tuple[float, float, float, float]:
    """3x3 rotation matrix -> (x, y, z, w) (Shepperd's method: the trace branch, else the largest diagonal entry).
    ``R`` is taken as a rotation; orthonormalise a measured matrix first (:func:`nearest_rotation`)."""
    R = np.asarray(R, np.float64)
    tr = np.trace(R)
    if tr > 0:
        s = math.sqrt(tr + 1.0) * 2
        return (float((R[2, 1] - R[1, 2]) / s), float((R[0, 2] - R[2, 0]) / s), float((R[1, 0] - R[0, 1]) / s),
                float(0.25 * s))
    i = int(np.argmax(np.diag(R)))
    j, k = (i + 1) % 3, (i + 2) % 3
    s = math.sqrt(1.0 + R[i, i] - R[j, j] - R[k, k]) * 2
    q = [0.0, 0.0, 0.0, 0.0]
    q[i] = 0.25 * s
    q[j] = (R[j, i] + R[i, j]) / s
    q[k] = (R[k, i] + R[i, k]) / s
    q[3] = (R[k, j] - R[j, k]) / s
    return tuple(float(v) for v in q)


def nearest_rotation(R) -> np.ndarray:
    """The orthonormal matrix nearest to ``R`` (Frobenius norm; ``U V^T`` of its SVD)."""
    u, _, vt = np.linalg.svd(np.asarray(R, np.float64))
    return u @ vt


def yaw_to_quaternion(yaw: float) -> Tuple[float, float, float, float]:
    """Rotation of ``yaw`` radians about +z (REP-103, counter-clockwise) as (x, y, z, w)."""
    return 0.0, 0.0, math.sin(yaw / 2.0), math.cos(yaw / 2.0)


def quaternion_to_yaw(q) -> float:
    """The rotation about +z of a quaternion (x, y, z, w), or of an object with fields x, y, z, w (a message)."""
    x, y, z, w = (q.x, q.y, q.z, q.w) if hasattr(q, "w") else q
    return math.atan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z))
