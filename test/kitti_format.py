"""An independent check of KITTI object result files against the devkit's format (readme of the object devkit):
``type truncated occluded alpha x1 y1 x2 y2 h w l x y z rotation_y score``, alpha and rotation_y in [-pi, pi]."""
import math

RESULT_TYPES = ("Car", "Van", "Truck", "Pedestrian", "Person_sitting", "Cyclist", "Tram", "Misc")


def check_result_text(text: str, width: int, height: int, source: str = "<result>") -> int:
    """Assert every line of ``text`` is a valid KITTI result line for a ``width`` x ``height`` image; return the count.

    alpha must equal rotation_y minus the viewing angle atan2(x, z) of the box centre (mod 2 pi, within 0.05 rad:
    OpenPCDet computes the viewing angle in the LiDAR frame, a few mrad from the camera frame's)."""
    n = 0
    for k, line in enumerate(text.splitlines(), 1):
        f = line.split()
        where = f"{source}:{k}"
        assert len(f) == 16, f"{where}: {len(f)} fields"
        assert f[0] in RESULT_TYPES, f"{where}: type {f[0]!r}"
        v = [float(x) for x in f[1:]]
        assert all(math.isfinite(x) for x in v), where
        trunc, occ, alpha, x1, y1, x2, y2, h, w, l, x, y, z, ry, score = v
        assert -math.pi <= alpha <= math.pi, f"{where}: alpha {alpha} outside [-pi, pi]"
        assert -math.pi <= ry <= math.pi, f"{where}: rotation_y {ry} outside [-pi, pi]"
        assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height, f"{where}: 2D box {x1, y1, x2, y2}"
        assert h > 0 and w > 0 and l > 0, f"{where}: dimensions {h, w, l}"
        assert occ in (-1, 0, 1, 2, 3) and (trunc == -1 or 0 <= trunc <= 1), where
        d = (alpha - (ry - math.atan2(x, z))) % (2 * math.pi)
        assert min(d, 2 * math.pi - d) < 0.05, f"{where}: alpha {alpha} does not match ry {ry} at ({x}, {z})"
        n += 1
    return n
