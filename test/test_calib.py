"""Calibration: KITTI object files (all three calibration days in the samples), KITTI raw calib dir, ROS CameraInfo +
extrinsic (3x4 / 4x4 / TF translation + quaternion), and clear errors for bad calibration / image-size mismatch."""
import numpy as np
import pytest

from cmfiou_core.calib import Calibration, CalibrationError, quaternion_to_matrix, transform_from_tf

DAYS = {"000000": 707.0493, "000006": 718.3351, "000001": 721.5377}  # one frame per calibration day


def _obj(kitti_samples, fid):
    return Calibration.from_kitti_object_file(kitti_samples / "object" / "training" / "calib" / f"{fid}.txt")


def _ref_project(c: Calibration, xyz: np.ndarray):
    """Independent float64 reference: P2 @ R0 @ Tr @ [x, y, z, 1]."""
    Tr = np.vstack([c.Tr_velo_to_cam, [0, 0, 0, 1]])
    R0 = np.eye(4)
    R0[:3, :3] = c.R0_rect
    hom = (c.P2 @ R0 @ Tr @ np.c_[xyz, np.ones(len(xyz))].T).T
    return hom[:, :2] / hom[:, 2:3], hom[:, 2] - c.P2[2, 3]


@pytest.mark.parametrize("fid,fx", sorted(DAYS.items()))
def test_object_calib_days(kitti_samples, fid, fx):
    c = _obj(kitti_samples, fid)
    assert c.P2[0, 0] == pytest.approx(fx, abs=1e-4)
    pts = np.fromfile(kitti_samples / "object" / "training" / "velodyne" / f"{fid}.bin", np.float32).reshape(-1, 4)
    xyz = pts[pts[:, 0] > 2, :3].astype(np.float64)
    uv, d = c.lidar_to_img(xyz)
    uv_ref, d_ref = _ref_project(c, xyz)
    np.testing.assert_allclose(uv, uv_ref, atol=1e-6)
    np.testing.assert_allclose(d, d_ref, atol=1e-9)
    # rect_to_lidar inverts lidar_to_rect exactly
    rect = c.lidar_to_rect(xyz)
    np.testing.assert_allclose(c.rect_to_lidar(rect), xyz, atol=1e-9)
    # img_to_rect is OpenPCDet's inverse (x = (u - cu) z / fu + tx, tx = -P03 / fu), which ignores P2[2, 3]
    # (P23 = 2.7 to 5 mm on KITTI): exact up to |u P23 / fu| for in-image points, which is what the pseudo points use
    from PIL import Image

    W, H = Image.open(kitti_samples / "object" / "training" / "image_2" / f"{fid}.png").size
    fov = (uv[:, 0] >= 0) & (uv[:, 0] < W) & (uv[:, 1] >= 0) & (uv[:, 1] < H) & (d >= 0)
    back = c.img_to_rect(uv[fov, 0], uv[fov, 1], d[fov])
    bound = np.abs(uv[fov] * c.P2[2, 3] / np.diag(c.P2)[:2]).max() + 1e-9
    assert np.abs(back - rect[fov]).max() <= bound < 0.01
    c2 = Calibration(**{k: v for k, v in c.to_dict().items()})
    np.testing.assert_allclose(c2.V2R, c.V2R)


def test_object_calib_text_roundtrip(kitti_samples, tmp_path):
    c = _obj(kitti_samples, "000008")
    f = tmp_path / "c.txt"
    f.write_text(c.to_kitti_object_text())
    c2 = Calibration.from_kitti_object_file(f)
    np.testing.assert_allclose(c2.P2, c.P2, rtol=1e-11)
    np.testing.assert_allclose(c2.V2R, c.V2R, rtol=1e-11, atol=1e-12)


def test_raw_calib_dir(kitti_samples):
    c = Calibration.from_kitti_raw_dir(kitti_samples / "raw" / "2011_09_26")
    assert (c.image_width, c.image_height) == (1242, 375)
    assert c.P2[0, 0] == pytest.approx(721.5377, abs=1e-4)  # same day as the 7.215377e+02 object frames
    c.check_image_size(1242, 375)
    with pytest.raises(CalibrationError, match="1224x370 but the calibration is for 1242x375"):
        c.check_image_size(1224, 370)
    c3 = Calibration.from_kitti_raw_dir(kitti_samples / "raw" / "2011_09_26", cam=3)
    assert c3.P2[0, 3] != c.P2[0, 3]
    with pytest.raises(CalibrationError, match="not found"):
        Calibration.from_kitti_raw_dir(kitti_samples / "raw")


def _rot_to_quat_xyzw(R):
    from scipy.spatial.transform import Rotation

    return Rotation.from_matrix(R).as_quat()  # scipy: (x, y, z, w), an independent implementation


def test_camera_info_and_tf(kitti_samples):
    c = _obj(kitti_samples, "000008")
    # camera_info for an already rectified image: P = P2, R = R0 folded into the extrinsic
    T = np.eye(4)
    T[:3] = c.R0_rect @ c.Tr_velo_to_cam
    ci4 = Calibration.from_camera_info(c.P2, 1242, 375, T)
    ci3 = Calibration.from_camera_info(c.P2.reshape(-1).tolist(), 1242, 375, T[:3], R_rect=np.zeros(9))
    q = _rot_to_quat_xyzw(T[:3, :3])
    ctf = Calibration.from_camera_info_tf(c.P2, 1242, 375, T[:3, 3], q)
    for other in (ci4, ci3):
        np.testing.assert_allclose(other.V2R, c.V2R, atol=1e-12)
    # KITTI's Tr is orthonormal only to ~1e-6, a quaternion represents the nearest rotation
    np.testing.assert_allclose(ctf.V2R, c.V2R, atol=1e-5)
    for other in (ci4, ci3, ctf):
        assert (other.image_width, other.image_height) == (1242, 375)
    np.testing.assert_allclose(quaternion_to_matrix(q), T[:3, :3], atol=1e-5)
    np.testing.assert_allclose(transform_from_tf(T[:3, 3], q), T, atol=1e-5)
    # exact on a synthetic rotation (90 deg about z: q = (0, 0, sin 45, cos 45))
    s = np.sqrt(0.5)
    np.testing.assert_allclose(quaternion_to_matrix([0, 0, s, s]), [[0, -1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-12)
    # K-only camera_info (P all zero)
    K = c.P2[:, :3]
    ck = Calibration.from_camera_info(np.zeros(12), 1242, 375, T, K=K)
    np.testing.assert_allclose(ck.P2[:, :3], K)
    with pytest.raises(CalibrationError, match="1000x375 but the calibration is for 1242x375"):
        ci4.check_image_size(1000, 375)


@pytest.mark.parametrize("mutate,match", [
    (lambda kv: kv.update(P2=np.r_[kv["P2"][:8], 0.5, 0, 1, 0]), "third row"),
    (lambda kv: kv.update(P2=-kv["P2"]), "focal lengths"),
    (lambda kv: kv.update(R0_rect=kv["R0_rect"] * 2), "not a rotation"),
    (lambda kv: kv.update(Tr_velo_to_cam=np.r_[kv["Tr_velo_to_cam"][:11], np.nan]), "NaN"),
    (lambda kv: kv.update(Tr_velo_to_cam=kv["Tr_velo_to_cam"][:9]), "expected 12 numbers"),
])
def test_bad_calibration_errors(kitti_samples, mutate, match):
    c = _obj(kitti_samples, "000008")
    kv = {"P2": c.P2.reshape(-1), "R0_rect": c.R0_rect.reshape(-1), "Tr_velo_to_cam": c.Tr_velo_to_cam.reshape(-1)}
    mutate(kv)
    with pytest.raises(CalibrationError, match=match):
        Calibration(kv["P2"], kv["R0_rect"], kv["Tr_velo_to_cam"])


def test_bad_files_and_extrinsics(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_text("P2: 1 0 0 0 0 1 0 0 0 0 1 0\n")
    with pytest.raises(CalibrationError, match="missing R0_rect, Tr_velo_to_cam"):
        Calibration.from_kitti_object_file(f)
    f.write_text("P2: 1 0 x 0\n")
    with pytest.raises(CalibrationError, match="non-numeric"):
        Calibration.from_kitti_object_file(f)
    with pytest.raises(CalibrationError, match="not found"):
        Calibration.from_kitti_object_file(tmp_path / "nope.txt")
    P = np.array([[700, 0, 600, 0], [0, 700, 180, 0], [0, 0, 1, 0]], float)
    bad4 = np.eye(4)
    bad4[3, 0] = 1
    with pytest.raises(CalibrationError, match="last row"):
        Calibration.from_camera_info(P, 1242, 375, bad4)
    with pytest.raises(CalibrationError, match="3x4 or 4x4"):
        Calibration.from_camera_info(P, 1242, 375, np.eye(3))
    with pytest.raises(CalibrationError, match="not unit length"):
        Calibration.from_camera_info_tf(P, 1242, 375, [0, 0, 0], [0, 0, 0, 2])
    with pytest.raises(CalibrationError, match="positive integer"):
        Calibration.from_camera_info(P, 0, 375, np.eye(4))
    with pytest.raises(CalibrationError, match="no K"):
        Calibration.from_camera_info(np.zeros(12), 1242, 375, np.eye(4))
