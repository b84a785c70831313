"""Train :class:`cmfiou_core.depth.penet.PENet` on the KITTI depth-completion layout.

Layout (official KITTI depth completion + KITTI raw for images/calibration)::

    <depth_root>/data_depth_velodyne/<split>/<drive>_sync/proj_depth/velodyne_raw/image_0{2,3}/<frame>.png
    <depth_root>/data_depth_annotated/<split>/<drive>_sync/proj_depth/groundtruth/image_0{2,3}/<frame>.png
    <raw_root>/<date>/<drive>_sync/image_0{2,3}/data/<frame>.png
    <raw_root>/<date>/calib_cam_to_cam.txt                      (P_rect_02 / P_rect_03 give K)

Depth PNGs are 16-bit, metres = value / 256, 0 = no value. Training follows the public recipe where it matters:
bottom crop to 352 x 1216, random crop of height 320, horizontal flip, masked L2 loss on ground-truth pixels, Adam
(betas 0.9/0.99, weight decay 1e-6), backbone LR / 10. Checkpoints are saved as ``{'model': state_dict, 'epoch'}``
(tensors + int only, loadable with ``weights_only=True`` by :func:`load_penet_checkpoint`).

    python -m cmfiou_core.depth.train_penet --depth-root D --raw-root R --out pe_cmfiou.pth --epochs 30 --device cuda
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from PIL import Image

from ..calib import Calibration
from .penet import PENet, build_penet, load_penet_checkpoint, position_grid


def read_depth_png(path) -> np.ndarray:
    """16-bit KITTI depth PNG -> float32 metres (value / 256, 0 = empty). Refuses 8-bit PNGs."""
    with Image.open(path) as im:
        a = np.array(im)
    if a.dtype not in (np.uint16, np.int32, np.uint32) or a.ndim != 2:
        raise ValueError(f"{path}: expected a 16-bit single-channel depth PNG, got {a.dtype} {a.shape}")
    return a.astype(np.float32) / 256.0


def masked_mse(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    m = gt > 0
    return ((pred - gt)[m] ** 2).mean()


class KittiDepthDataset(torch.utils.data.Dataset):
    def __init__(self, depth_root, raw_root, split: str = "train", crop=(352, 1216), rand_h: int = 320,
                 train: bool = True):
        self.depth_root, self.raw_root = Path(depth_root), Path(raw_root)
        vel = sorted(self.depth_root.glob(f"data_depth_velodyne/{split}/*_sync/proj_depth/velodyne_raw/image_0[23]/*.png"))
        self.items: List[Dict] = []
        for p in vel:
            drive, cam, frame = p.parts[-5], p.parts[-2], p.name
            gt = self.depth_root / "data_depth_annotated" / split / drive / "proj_depth" / "groundtruth" / cam / frame
            rgb = self.raw_root / drive[:10] / drive / cam / "data" / frame
            if gt.is_file() and rgb.is_file():
                self.items.append({"d": p, "gt": gt, "rgb": rgb, "date": drive[:10], "cam": int(cam[-1])})
        if not self.items:
            raise FileNotFoundError(f"no (velodyne_raw, groundtruth, image) triplets under {depth_root} / {raw_root}")
        self.crop, self.rand_h, self.train = crop, rand_h, train
        self._K: Dict = {}

    def __len__(self):
        return len(self.items)

    def _k(self, date, cam):
        if (date, cam) not in self._K:
            c = Calibration.from_kitti_raw_dir(self.raw_root / date, cam=cam)
            self._K[(date, cam)] = c.P2[:, :3].astype(np.float32)
        return self._K[(date, cam)].copy()

    def __getitem__(self, i):
        it = self.items[i]
        d, gt = read_depth_png(it["d"]), read_depth_png(it["gt"])
        with Image.open(it["rgb"]) as im:
            rgb = np.array(im.convert("RGB"), dtype=np.float32)
        K = self._k(it["date"], it["cam"])
        H, W = d.shape
        ch, cw = self.crop
        y0, x0 = H - ch, (W - cw) // 2  # bottom crop (public BottomCrop: bottom rows, centred columns)
        if self.train and self.rand_h < ch:
            y0 += random.randint(0, ch - self.rand_h)
            ch = self.rand_h
        sl = (slice(y0, y0 + ch), slice(x0, x0 + cw))
        d, gt, rgb = d[sl], gt[sl], rgb[sl]
        K[0, 2] -= x0
        K[1, 2] -= y0
        if self.train and random.random() < 0.5:
            d, gt, rgb = d[:, ::-1], gt[:, ::-1], rgb[:, ::-1]
            K[0, 2] = cw - 1 - K[0, 2]
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
        return {"rgb": t(rgb).permute(2, 0, 1), "d": t(d)[None], "gt": t(gt)[None], "K": t(K)}


def train_step(model: PENet, batch: Dict[str, torch.Tensor], opt: torch.optim.Optimizer) -> float:
    model.train()
    B, _, H, W = batch["d"].shape
    pos = position_grid(H, W, batch["d"].device).expand(B, -1, -1, -1)
    pred = model(batch["rgb"], batch["d"], pos, batch["K"])
    loss = masked_mse(pred, batch["gt"])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def make_optimizer(model: PENet, lr: float = 1e-3, weight_decay: float = 1e-6) -> torch.optim.Optimizer:
    bone = list(model.backbone.parameters())
    ids = {id(p) for p in bone}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return torch.optim.Adam([{"params": bone, "lr": lr / 10}, {"params": rest}], lr=lr, betas=(0.9, 0.99),
                            weight_decay=weight_decay)


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth-root", required=True)
    ap.add_argument("--raw-root", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--resume", default=None, help="checkpoint in the pe.pth.tar layout (weights_only load)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    model = build_penet()
    if a.resume:
        load_penet_checkpoint(model, a.resume)
    model.to(dev)
    opt = make_optimizer(model, a.lr)
    ds = KittiDepthDataset(a.depth_root, a.raw_root, "train")
    dl = torch.utils.data.DataLoader(ds, batch_size=a.batch_size, shuffle=True, num_workers=a.workers,
                                     drop_last=True)
    for ep in range(a.epochs):
        for it, batch in enumerate(dl):
            loss = train_step(model, {k: v.to(dev) for k, v in batch.items()}, opt)
            if it % 100 == 0:
                print(f"epoch {ep} iter {it}/{len(dl)} loss {loss:.4f}", flush=True)
        torch.save({"model": model.state_dict(), "epoch": ep}, a.out)


if __name__ == "__main__":
    main()
