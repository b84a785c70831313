"""``python -m cmfiou_core.tools.make_depth --root ROOT [--device cuda]``: write the official ``velodyne_depth/<id>.npy``
(float16 N×8, raw rows then pseudo rows) for every frame of a KITTI-layout folder with the online depth-completion
stage (the same code the pipeline runs), on the GPU when available. The dataset reads these files instead of
completing depth on the CPU during training. Existing files are kept unless ``--overwrite``."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--root", required=True, help="folder holding training/ (and/or testing/)")
    ap.add_argument("--split-dir", default="training")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from PIL import Image

    from cmfiou_core.calib import Calibration
    from cmfiou_core.depth.config import DepthConfig
    from cmfiou_core.depth.io import write_velodyne_depth
    from cmfiou_core.depth.pseudo import PseudoPointGenerator

    base = Path(args.root) / args.split_dir
    ids = sorted(p.stem for p in (base / "velodyne").glob("*.bin"))
    if not ids:
        print(f"no frames under {base}/velodyne", file=sys.stderr)
        return 2
    gen = PseudoPointGenerator(DepthConfig(timing=False))
    dev = torch.device(args.device)
    out = base / "velodyne_depth"
    out.mkdir(parents=True, exist_ok=True)
    t0, n = time.time(), 0
    with torch.no_grad():
        for fid in ids:
            dst = out / f"{fid}.npy"
            if dst.is_file() and not args.overwrite:
                continue
            img = np.array(Image.open(base / "image_2" / f"{fid}.png").convert("RGB"))
            calib = Calibration.from_kitti_object_file(base / "calib" / f"{fid}.txt", img.shape[1], img.shape[0])
            pts = np.fromfile(base / "velodyne" / f"{fid}.bin", np.float32).reshape(-1, 4)
            res = gen(torch.from_numpy(pts).to(dev), torch.from_numpy(img).to(dev), calib)
            tmp = out / f"{fid}.tmp.npy"
            write_velodyne_depth(tmp, res.all_rows.cpu().numpy())
            tmp.replace(dst)
            n += 1
    print(f"wrote {n} velodyne_depth files to {out} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
