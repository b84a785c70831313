"""Shared test fixtures. spconv's CPU path is only correct with one torch thread (measured): force it everywhere."""
import os
from pathlib import Path

import pytest

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover - torch is a hard requirement, setup.sh installs it
    torch = None

# Triton's interpreter runs the engine's @triton.jit kernels on CPU tensors (fixture ``triton_device``). Triton decides
# at its first import, so it is chosen here, before any test module is imported; on a CUDA host the kernels compile.
# Only code that asks for it runs Triton on the CPU (engine.sparse.TRITON_ON_CPU, direct kernel calls in tests).
if torch is not None and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
KITTI_SAMPLES = Path(os.environ.get("CMFIOU_KITTI_SAMPLES", REPO.parent / "shared" / "kitti_samples"))
SHARED = Path(os.environ.get("CMFIOU_SHARED", REPO.parent / "shared"))


def kitti_object_frame(root: Path, fid: str):
    """KITTI object frame ``fid`` of ``root`` (the kitti_samples folder) -> (points (N, 4) float32, RGB image,
    Calibration of its calib file and image size)."""
    import numpy as np
    from PIL import Image

    from cmfiou_core.calib import Calibration

    d = Path(root) / "object" / "training"
    img = np.array(Image.open(d / "image_2" / f"{fid}.png").convert("RGB"))
    cal = Calibration.from_kitti_object_file(d / "calib" / f"{fid}.txt", img.shape[1], img.shape[0])
    pts = np.fromfile(d / "velodyne" / f"{fid}.bin", np.float32).reshape(-1, 4)
    return pts, img, cal


def assert_detections_agree(a, b, min_count: int, max_dist: float = 0.5, tol: float = 1e-2) -> None:
    """Detections a and b (eager vs engine): at least ``min_count`` each, the same count, every box matched (same
    class, BEV centre within ``max_dist``) with box parameters and scores within ``tol``."""
    import numpy as np
    from engine_agreement import match

    assert len(a.scores) >= min_count and len(a.scores) == len(b.scores)
    pairs = match(a, b, max_dist=max_dist)
    assert len(pairs) == len(a.scores)
    i, j = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    assert np.abs(a.boxes[i] - b.boxes[j])[:, :6].max() <= tol
    assert np.abs(a.scores[i] - b.scores[j]).max() <= tol


@pytest.fixture(scope="session")
def kitti_samples() -> Path:
    """Root of the real KITTI sample frames; tests using it skip cleanly when it is absent."""
    if not (KITTI_SAMPLES / "object" / "training").is_dir():
        pytest.skip(f"KITTI samples not found at {KITTI_SAMPLES} (set CMFIOU_KITTI_SAMPLES)")
    return KITTI_SAMPLES


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared reference folder not found at {SHARED} (set CMFIOU_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def triton_device() -> str:
    """Device for tests of the Triton kernels: 'cuda' (compiled) where CUDA exists, else 'cpu' (Triton's interpreter,
    set above); skips without Triton. Keep CPU sizes small: the interpreter runs each program in numpy."""
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("Triton is not installed (scripts/setup.sh installs it unless CMFIOU_TRITON=0)")
    if torch.cuda.is_available():
        return "cuda"
    from cmfiou_core.engine import triton_conv

    if not triton_conv.INTERPRETER:
        pytest.skip("no CUDA and Triton's interpreter is off (TRITON_INTERPRET=0, or triton imported before conftest)")
    return "cpu"


_SESSION_START = __import__("time").time()


def _mapped_shm() -> set:
    """/dev/shm paths some live process has mapped (read from /proc/*/maps)."""
    used = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            for line in maps.read_text().splitlines():
                i = line.find("/dev/shm/")
                if i >= 0:
                    used.add(line[i:].split(" (deleted)")[0])
        except OSError:      # the process ended, or is not ours to read
            continue
    return used


@pytest.fixture(scope="module", autouse=True)
def _release_stale_fastdds_segments():
    """After each test module: delete the Fast DDS shared-memory segments (/dev/shm/fastdds_*, ~34 MB each with our
    enlarged segment size) that this session's ROS child processes left behind when they were killed and that no
    live process maps any more. /dev/shm is RAM: a day of such leftovers once filled 15 GB of a 24 GB host."""
    yield
    shm = Path("/dev/shm")
    if not shm.is_dir():
        return
    # data segments only (>= 1 MB; lock and port files are small): one no process maps is garbage
    stale = [p for p in shm.glob("fastdds_*")
             if p.is_file() and p.stat().st_mtime >= _SESSION_START and p.stat().st_size >= 1 << 20]
    if not stale:
        return
    used = _mapped_shm()
    for p in stale:
        if str(p) not in used:
            try:
                p.unlink()
            except OSError:
                pass
