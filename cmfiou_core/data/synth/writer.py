"""Writer of the generator: KITTI object layout on disk (calib, image_2, velodyne, planes, label_2, ImageSets),
parallel over frames with identical bytes for any number of workers, and the cached demo scenes."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .frame import SyntheticFrame, generate_frame
from .scene import SceneConfig


def write_frame(root: Union[str, Path], frame_id: str, fr: SyntheticFrame, split: str = "training") -> None:
    from PIL import Image

    base = Path(root) / split
    for sub in ("calib", "image_2", "velodyne", "planes") + (("label_2",) if split == "training" else ()):
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "calib" / f"{frame_id}.txt").write_text(fr.calib.to_kitti_object_text())
    Image.fromarray(fr.image).save(base / "image_2" / f"{frame_id}.png", optimize=False, compress_level=1)
    fr.points.astype(np.float32).tofile(base / "velodyne" / f"{frame_id}.bin")
    (base / "planes" / f"{frame_id}.txt").write_text(
        "# Matrix\nWIDTH 4\nHEIGHT 1\n" + " ".join(f"{v:.6e}" for v in fr.plane) + "\n")
    if split == "training":
        (base / "label_2" / f"{frame_id}.txt").write_text(fr.label_text)


def _gen_one(args):
    root, seed, idx, split, cfg = args
    fr = generate_frame(seed, idx, cfg)
    write_frame(root, f"{idx:06d}", fr, split)
    return idx, int(fr.points.shape[0])


def _cuda_initialized() -> bool:
    torch = sys.modules.get("torch")
    try:
        return bool(torch is not None and torch.cuda.is_initialized())
    except Exception:  # noqa: BLE001 - a torch without CUDA support
        return False


def generate_dataset(out: Union[str, Path], num: Optional[int] = None, seed: int = 0, split: str = "training",
                     val_fraction: float = 0.5, workers: Optional[int] = None, cfg: SceneConfig = SceneConfig(),
                     start: int = 0, num_frames: Optional[int] = None) -> Path:
    """Write ``num`` frames (ids ``start..start+num-1``; ``num_frames`` is an alias) and ``ImageSets`` (train/val
    split for ``training``, test.txt for ``testing``). Returns ``out``."""
    if num is None:
        num = num_frames
    elif num_frames is not None and num_frames != num:
        raise ValueError(f"generate_dataset: num={num} and num_frames={num_frames} disagree")
    if num is None:
        raise ValueError("generate_dataset: give num (number of frames)")
    if split not in ("training", "testing"):
        raise ValueError(f"split must be 'training' or 'testing', got {split!r}")
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = list(range(start, start + num))
    jobs = [(str(out), seed, i, split, cfg) for i in ids]
    workers = workers if workers is not None else min(len(os.sched_getaffinity(0)), 8)
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        # fork is fast, but a process that has initialised CUDA must not fork (the children hang: measured, a
        # benchmark that built its CUDA pipeline before generating its scenes printed nothing for minutes)
        method = "spawn" if _cuda_initialized() else "fork"
        with mp.get_context(method).Pool(workers) as pool:
            list(pool.imap_unordered(_gen_one, jobs, chunksize=1))
    else:
        for j in jobs:
            _gen_one(j)
    sets = out / "ImageSets"
    sets.mkdir(exist_ok=True)
    names = [f"{i:06d}" for i in ids]
    if split == "training":
        perm = np.random.default_rng([int(seed), 987654321]).permutation(len(names))
        n_val = int(round(val_fraction * len(names)))
        val = sorted(names[i] for i in perm[:n_val])
        train = sorted(names[i] for i in perm[n_val:])
        (sets / "train.txt").write_text("".join(f"{n}\n" for n in train))
        (sets / "val.txt").write_text("".join(f"{n}\n" for n in val))
        (sets / "trainval.txt").write_text("".join(f"{n}\n" for n in names))
    else:
        (sets / "test.txt").write_text("".join(f"{n}\n" for n in names))
    return out


def default_demo_dir() -> Path:
    env = os.environ.get("CMFIOU_DEMO_DATA")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "cmfiou" / "demo"


def ensure_demo_scenes(n: int = 8, root: Optional[Union[str, Path]] = None, seed: int = 2024) -> Path:
    """Generate ``n`` demo frames into the cache folder on first use (``root``, else ``$CMFIOU_DEMO_DATA`` -- set to
    the checkout's git-ignored ``data/generated/demo`` by scripts/setup.sh's env file -- else
    ``$XDG_CACHE_HOME/cmfiou/demo``, never inside the installed package); later calls return at once."""
    root = Path(root) if root is not None else default_demo_dir()
    stamp = root / f".complete_n{n}_s{seed}"
    if stamp.is_file():
        return root
    generate_dataset(root, n, seed=seed, split="training", val_fraction=0.5)
    stamp.write_text("ok\n")
    return root
