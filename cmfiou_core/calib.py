"""One calibration type used everywhere: KITTI object calib files, KITTI raw calib files, ROS CameraInfo + extrinsic.

Frames follow the KITTI conventions:
- LiDAR (velodyne) frame -> reference camera frame with ``Tr_velo_to_cam`` (3x4),
- reference camera -> rectified camera frame with ``R0_rect`` (3x3),
- rectified camera -> image plane of the left colour camera with ``P2`` (3x4).

The numpy methods compute in float64 unless given float32; the torch methods run on the device/dtype of their input.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np

from .geometry.rotation import quaternion_to_matrix as _quaternion_to_matrix

ArrayLike = Union[np.ndarray, "torch.Tensor"]  # noqa: F821


class CalibrationError(ValueError):
    """Raised for malformed or inconsistent calibration data (the message says which field and why)."""


def _as_matrix(name: str, values, shape) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size != int(np.prod(shape)):
        raise CalibrationError(f"{name}: expected {int(np.prod(shape))} numbers for a {shape} matrix, got {arr.size}")
    arr = arr.reshape(shape)
    if not np.all(np.isfinite(arr)):
        raise CalibrationError(f"{name}: contains NaN or inf")
    return arr


def quaternion_to_matrix(q_xyzw) -> np.ndarray:
    """ROS/TF quaternion (x, y, z, w) -> 3x3 rotation matrix. The quaternion must be (close to) unit length."""
    return _quaternion_to_matrix(q_xyzw, unit_tol=1e-3, error=CalibrationError)


def transform_from_tf(translation, rotation_xyzw) -> np.ndarray:
    """TF translation (x, y, z) + rotation (x, y, z, w) -> 4x4 homogeneous transform."""
    t = np.asarray(translation, dtype=np.float64).reshape(-1)
    if t.size != 3 or not np.all(np.isfinite(t)):
        raise CalibrationError(f"translation must be 3 finite numbers, got {translation!r}")
    T = np.eye(4)
    T[:3, :3] = quaternion_to_matrix(rotation_xyzw)
    T[:3, 3] = t
    return T


def _extrinsic_3x4(T, name: str) -> np.ndarray:
    arr = np.asarray(T, dtype=np.float64)
    if arr.shape == (4, 4):
        if not np.all(np.isfinite(arr)):
            raise CalibrationError(f"{name}: contains NaN or inf")
        if np.abs(arr[3] - np.array([0.0, 0.0, 0.0, 1.0])).max() > 1e-6:
            raise CalibrationError(f"{name}: the last row of a 4x4 rigid transform must be [0, 0, 0, 1], "
                                   f"got {arr[3].tolist()}")
        arr = arr[:3]
    if arr.shape != (3, 4):
        raise CalibrationError(f"{name} must be 3x4 or 4x4, got shape {arr.shape}")
    return arr


@dataclass(frozen=True)
class Calibration:
    P2: np.ndarray  # (3, 4) rectified camera -> image
    R0_rect: np.ndarray  # (3, 3)
    Tr_velo_to_cam: np.ndarray  # (3, 4)
    image_width: Optional[int] = None  # when known (CameraInfo, or set by the loader from the image)
    image_height: Optional[int] = None

    def __post_init__(self) -> None:
        P2 = _as_matrix("P2", self.P2, (3, 4))
        R0 = _as_matrix("R0_rect", self.R0_rect, (3, 3))
        Tr = _as_matrix("Tr_velo_to_cam", self.Tr_velo_to_cam, (3, 4))
        if P2[0, 0] <= 0 or P2[1, 1] <= 0:
            raise CalibrationError(f"P2: focal lengths must be positive (fx={P2[0, 0]}, fy={P2[1, 1]})")
        if abs(P2[2, 2] - 1.0) > 1e-6 or np.any(np.abs(P2[2, :2]) > 1e-9):
            raise CalibrationError(f"P2: third row must be [0, 0, 1, t], got {P2[2].tolist()}")
        for name, R in (("R0_rect", R0), ("Tr_velo_to_cam rotation", Tr[:, :3])):
            err = np.abs(R @ R.T - np.eye(3)).max()
            if err > 1e-3:
                raise CalibrationError(f"{name} is not a rotation matrix (|R R^T - I| = {err:.3g})")
        for n, v in (("image_width", self.image_width), ("image_height", self.image_height)):
            if v is not None and (int(v) != v or v <= 0):
                raise CalibrationError(f"{n} must be a positive integer, got {v!r}")
        object.__setattr__(self, "P2", P2)
        object.__setattr__(self, "R0_rect", R0)
        object.__setattr__(self, "Tr_velo_to_cam", Tr)

    # ------------------------------------------------------------------ constructors
    @staticmethod
    def _parse_kv(text: str, source: str) -> Dict[str, np.ndarray]:
        out = {}
        for lineno, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or ":" not in line:
                continue
            key, val = line.split(":", 1)
            try:
                out[key.strip()] = np.array([float(x) for x in val.split()], dtype=np.float64)
            except ValueError:
                # non-numeric entries (e.g. calib_time in raw files) are skipped
                if key.strip() not in ("calib_time",):
                    raise CalibrationError(f"{source}:{lineno}: non-numeric value for {key.strip()!r}") from None
        return out

    @classmethod
    def from_kitti_object_file(cls, path: Union[str, Path], image_width=None, image_height=None) -> "Calibration":
        """``training/calib/NNNNNN.txt`` of the KITTI object benchmark."""
        path = Path(path)
        if not path.is_file():
            raise CalibrationError(f"calibration file not found: {path}")
        kv = cls._parse_kv(path.read_text(), str(path))
        missing = [k for k in ("P2", "R0_rect", "Tr_velo_to_cam") if k not in kv]
        if missing:
            raise CalibrationError(f"{path}: missing {', '.join(missing)} (is this a KITTI object calib file?)")
        return cls(kv["P2"], kv["R0_rect"], kv["Tr_velo_to_cam"], image_width, image_height)

    @classmethod
    def from_kitti_raw_dir(cls, date_dir: Union[str, Path], cam: int = 2) -> "Calibration":
        """KITTI raw ``<date>/calib_cam_to_cam.txt`` + ``calib_velo_to_cam.txt`` for camera ``cam`` (default 2)."""
        d = Path(date_dir)
        c2c, v2c = d / "calib_cam_to_cam.txt", d / "calib_velo_to_cam.txt"
        for p in (c2c, v2c):
            if not p.is_file():
                raise CalibrationError(f"KITTI raw calibration file not found: {p}")
        kc = cls._parse_kv(c2c.read_text(), str(c2c))
        kv = cls._parse_kv(v2c.read_text(), str(v2c))
        pk, rk, sk = f"P_rect_{cam:02d}", "R_rect_00", f"S_rect_{cam:02d}"
        for k, src in ((pk, c2c), (rk, c2c)):
            if k not in kc:
                raise CalibrationError(f"{src}: missing {k}")
        if "R" not in kv or "T" not in kv:
            raise CalibrationError(f"{v2c}: missing R or T")
        Tr = np.concatenate([kv["R"].reshape(3, 3), kv["T"].reshape(3, 1)], axis=1)
        w = h = None
        if sk in kc and kc[sk].size == 2:
            w, h = int(round(kc[sk][0])), int(round(kc[sk][1]))
        return cls(kc[pk], kc[rk], Tr, w, h)

    @classmethod
    def from_camera_info(cls, P, width: int, height: int, T_lidar_to_cam, R_rect=None, K=None) -> "Calibration":
        """ROS ``sensor_msgs/CameraInfo`` (its 3x4 ``P``, width, height) plus a LiDAR->camera-optical extrinsic.

        ``T_lidar_to_cam``: 3x4 or 4x4 transform from the LiDAR frame to the camera optical frame (z forward,
        x right, y down). ``R_rect``: the CameraInfo ``R`` (rectification); identity when omitted.
        ``K``: the CameraInfo ``K`` (3x3); used as ``P = [K | 0]`` when ``P`` is None or all zero (drivers that
        publish only K). The image is then assumed rectified (no distortion handling here).
        """
        P_arr = None if P is None else np.asarray(P, dtype=np.float64)
        if P_arr is None or (P_arr.size == 12 and np.allclose(P_arr, 0)):
            if K is None:
                raise CalibrationError("CameraInfo: P is missing/all zero and no K was given")
            Km = _as_matrix("CameraInfo.K", K, (3, 3))
            P_arr = np.concatenate([Km, np.zeros((3, 1))], axis=1)
        T = _extrinsic_3x4(T_lidar_to_cam, "T_lidar_to_cam")
        R0 = np.eye(3) if R_rect is None else _as_matrix("CameraInfo.R", R_rect, (3, 3))
        if np.allclose(R0, 0):
            R0 = np.eye(3)  # CameraInfo leaves R all-zero for uncalibrated/monocular cameras
        for n, v in (("width", width), ("height", height)):
            if isinstance(v, bool) or int(v) != v or int(v) <= 0:
                raise CalibrationError(f"CameraInfo.{n} must be a positive integer, got {v!r} (uncalibrated camera?)")
        return cls(P_arr, R0, T, int(width), int(height))

    @classmethod
    def from_camera_info_tf(cls, P, width: int, height: int, translation, rotation_xyzw, R_rect=None,
                            K=None) -> "Calibration":
        """CameraInfo plus the TF ``lookupTransform(camera_optical_frame, lidar_frame)`` result.

        ``translation`` (x, y, z) and ``rotation_xyzw`` (x, y, z, w; ROS order) describe the pose of the LiDAR
        frame in the camera optical frame, i.e. the transform mapping LiDAR coordinates into camera coordinates.
        """
        return cls.from_camera_info(P, width, height, transform_from_tf(translation, rotation_xyzw), R_rect, K)

    def with_image_size(self, width: int, height: int) -> "Calibration":
        return Calibration(self.P2, self.R0_rect, self.Tr_velo_to_cam, int(width), int(height))

    def check_image_size(self, width: int, height: int) -> None:
        """Raise :class:`CalibrationError` when the calibration records an image size different from (width, height)."""
        known = (self.image_width is not None) or (self.image_height is not None)
        if known and ((self.image_width is not None and self.image_width != width)
                      or (self.image_height is not None and self.image_height != height)):
            raise CalibrationError(
                f"image is {width}x{height} but the calibration is for {self.image_width}x{self.image_height}: "
                "the camera_info and image topics do not belong together (or the image was resized)")

    # ------------------------------------------------------------------ derived matrices
    @property
    def V2R(self) -> np.ndarray:
        """4x4 LiDAR -> rectified camera (R0_rect @ Tr_velo_to_cam)."""
        m = np.eye(4)
        m[:3, :3] = self.R0_rect
        Tr = np.eye(4)
        Tr[:3] = self.Tr_velo_to_cam
        return m @ Tr

    @property
    def R2V(self) -> np.ndarray:
        return np.linalg.inv(self.V2R)

    # ------------------------------------------------------------------ transforms (numpy or torch)
    @staticmethod
    def _mat(m: np.ndarray, like):
        if isinstance(like, np.ndarray):
            return m.astype(like.dtype if like.dtype in (np.float32, np.float64) else np.float64)
        import torch

        return torch.as_tensor(m, dtype=like.dtype, device=like.device)

    def lidar_to_rect(self, pts):
        """(N, 3) LiDAR xyz -> (N, 3) rectified camera xyz."""
        M = self._mat(self.V2R, pts)
        return pts[:, :3] @ M[:3, :3].T + M[:3, 3]

    def rect_to_lidar(self, pts):
        M = self._mat(self.R2V, pts)
        return pts[:, :3] @ M[:3, :3].T + M[:3, 3]

    def rect_to_img(self, pts):
        """(N, 3) rect xyz -> ((N, 2) pixel uv, (N,) depth in the rect frame, i.e. P2-projected z)."""
        P = self._mat(self.P2, pts)
        hom = pts[:, :3] @ P[:, :3].T + P[:, 3]
        depth = hom[:, 2]
        uv = hom[:, :2] / depth[:, None]
        return uv, depth - P[2, 3]

    def lidar_to_img(self, pts):
        return self.rect_to_img(self.lidar_to_rect(pts))

    def img_to_rect(self, u, v, depth_rect):
        """Pixel (u, v) with rect-frame depth z -> (N, 3) rect xyz (inverse of ``rect_to_img``)."""
        P = self.P2
        fu, fv, cu, cv = P[0, 0], P[1, 1], P[0, 2], P[1, 2]
        tx, ty = P[0, 3] / (-fu), P[1, 3] / (-fv)
        x = (u - cu) * depth_rect / fu + tx
        y = (v - cv) * depth_rect / fv + ty
        if isinstance(u, np.ndarray):
            return np.stack([x, y, depth_rect], axis=-1)
        import torch

        return torch.stack([x, y, depth_rect], dim=-1)

    def to_dict(self) -> dict:
        return {"P2": self.P2.tolist(), "R0_rect": self.R0_rect.tolist(), "Tr_velo_to_cam": self.Tr_velo_to_cam.tolist(),
                "image_width": self.image_width, "image_height": self.image_height}

    def to_kitti_object_text(self) -> str:
        """KITTI object calib file text (P0..P3 = P2, Tr_imu_to_velo = identity), readable by any KITTI tool."""
        f = lambda a: " ".join(f"{x:.12e}" for x in np.asarray(a).reshape(-1))  # noqa: E731
        lines = [f"P{i}: {f(self.P2)}" for i in range(4)]
        lines += [f"R0_rect: {f(self.R0_rect)}", f"Tr_velo_to_cam: {f(self.Tr_velo_to_cam)}",
                  f"Tr_imu_to_velo: {f(np.eye(4)[:3])}"]
        return "\n".join(lines) + "\n"
