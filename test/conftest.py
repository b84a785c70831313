"""Shared test fixtures. spconv's CPU path is only correct with one torch thread (measured): force it everywhere."""
import os
from pathlib import Path

import pytest

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover - torch is a hard requirement, setup.sh installs it
    pass

REPO = Path(__file__).resolve().parents[1]
KITTI_SAMPLES = Path(os.environ.get("CMFIOU_KITTI_SAMPLES", REPO.parent / "shared" / "kitti_samples"))
SHARED = Path(os.environ.get("CMFIOU_SHARED", REPO.parent / "shared"))


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
