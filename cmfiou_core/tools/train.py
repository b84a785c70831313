"""``cmfiou-train``: train CMF-IOU (single GPU, or multi-GPU with ``torchrun --nproc_per_node=N``).

    cmfiou-train --config config/cmfiou_kitti.yaml --data DIR [--epochs N] [--batch-size B] [--lr LR] [--workers W]
                 [--amp bf16|fp16|off] [--resume CKPT | --init CKPT] [--out DIR] [--max-minutes M] [--eval-every E]
                 [--no-pseudo] [--export-fp16 PATH]
    torchrun --standalone --nproc_per_node=2 -m cmfiou_core.tools.train --config ... --data ...
    cmfiou-train --toy --epochs 2 --out /tmp/toy      # engine smoke test (tiny model + synthetic data, no KITTI)

Optimisation defaults follow the official KITTI recipe (adam_onecycle, LR 0.005, 20 epochs, batch 2 per GPU, clip
10).  They can be set in the YAML under ``data.optimization`` (keys: optimizer, epochs, batch_size_per_gpu, lr,
weight_decay, betas, moms, div_factor, final_div_factor, pct_start, grad_norm_clip, num_workers, seed); command-line
flags override them.

The engine (``cmfiou_core.train``) is model-agnostic; this file only adapts the detector and the KITTI dataset to it
(``_build_model``, ``_build_train_data``, ``_make_prepare_fn``, ``_build_eval_fn``); they import lazily.
Dataset options come from the rest of ``data:`` (``cmfiou_core.data.kitti.DatasetConfig.from_dict``).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any, Callable, Dict, Tuple

log = logging.getLogger("cmfiou.train")



def default_config() -> str:
    """The installed config/cmfiou_kitti.yaml (cmfiou_core.resources; an error naming where it looked if missing)."""
    from cmfiou_core.pipeline import default_config as _default

    return str(_default())

from cmfiou_core.config import ConfigError  # noqa: E402
from cmfiou_core.model.model_config import OPT_DEFAULTS, optimization_settings  # noqa: E402,F401  (re-exported)
from cmfiou_core.model.spconv_compat import ALGORITHM_NAMES  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cmfiou-train", description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=None,
                    help="model YAML (model/depth/data sections; default: the installed config/cmfiou_kitti.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                    help="override one config value (repeatable; VALUE is YAML), validated with the rest, stored in "
                         "the checkpoint's config: e.g. --set data.augment.photometric=true")
    ap.add_argument("--data", help="KITTI root (the folder holding object/training or training/)")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--batch-size", type=int, help="per process/GPU (official: 2 x 2 GPUs)")
    ap.add_argument("--lr", type=float, help="one-cycle peak LR (official MM: 0.005)")
    ap.add_argument("--workers", type=int, help="DataLoader workers per process")
    ap.add_argument("--amp", choices=["bf16", "fp16", "off"], default="off")
    ap.add_argument("--seed", type=int)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--resume", help="continue exactly from a training checkpoint (e.g. OUT/ckpt/latest.pth)")
    g.add_argument("--init", help="initialise weights from a checkpoint (non-strict), fresh optimizer/schedule")
    ap.add_argument("--out", default="output/cmfiou_train", help="output folder (ckpt/, tb/, metrics.jsonl)")
    ap.add_argument("--max-minutes", type=float, help="wall-clock budget from process start; stops cleanly + saves")
    ap.add_argument("--time-schedule", action="store_true",
                    help="with --max-minutes: drive the one-cycle schedule by elapsed time so it completes in budget")
    ap.add_argument("--max-iters", type=int, help="stop (and save) after this many iterations (smoke tests)")
    ap.add_argument("--eval-every", type=int, default=0, help="evaluate every E epochs (0 = never)")
    ap.add_argument("--no-pseudo", action="store_true", help="LiDAR-only training: the pseudo branch gets no points")
    ap.add_argument("--export-fp16", metavar="PATH", help="after training, write an fp16 weights export (<= 40 MB)")
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--grad-probe", type=float, default=0.0, metavar="NORM",
                    help="debug: for steps whose gradient norm exceeds NORM (or is non-finite) write per-module "
                         "forward/gradient magnitudes to OUT/grad_probe.jsonl (cmfiou_core/train/grad_probe.py)")
    ap.add_argument("--save-every-minutes", type=float, default=0.0, help="extra mid-epoch saves of latest.pth")
    ap.add_argument("--keep-last", type=int, default=5)
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--spconv-algo", default="auto", choices=["auto", *ALGORITHM_NAMES],
                    help="spconv algorithm of every sparse convolution while training: auto = implicit_gemm on CUDA "
                         "(spconv's GPU default; measured ~1 it/s at batch 2 on Native on the H200), native on the "
                         "CPU (its only one). Inference always runs Native: the GPU's implicit GEMM is not "
                         "reproducible in this model (model/spconv_compat.py)")
    ap.add_argument("--no-sync-bn", action="store_true", help="keep per-GPU BatchNorm under DDP")
    ap.add_argument("--find-unused", choices=["auto", "on", "off"], default="auto",
                    help="DDP find_unused_parameters (auto: on for the detector, off for --toy)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--no-tensorboard", action="store_true")
    ap.add_argument("--toy", action="store_true", help="train the engine's toy model on synthetic data (smoke test)")
    return ap


# ---------------------------------------------------------------------------------------------------- config
def make_train_config(args, opt: Dict[str, Any]):
    from cmfiou_core.train import TrainConfig

    def pick(cli, key):
        return opt[key] if cli is None else cli

    return TrainConfig(
        epochs=pick(args.epochs, "epochs"), batch_size=pick(args.batch_size, "batch_size_per_gpu"),
        lr=pick(args.lr, "lr"), weight_decay=opt["weight_decay"], betas=tuple(opt["betas"]), moms=tuple(opt["moms"]),
        div_factor=opt["div_factor"], final_div_factor=opt["final_div_factor"], pct_start=opt["pct_start"],
        grad_clip=opt["grad_norm_clip"], amp=args.amp, workers=pick(args.workers, "num_workers"),
        seed=pick(args.seed, "seed"), out_dir=args.out, max_minutes=args.max_minutes,
        time_schedule=args.time_schedule, max_iters=args.max_iters, eval_every=args.eval_every,
        log_every=args.log_every, save_every_minutes=args.save_every_minutes, keep_last=args.keep_last,
        sync_bn=not args.no_sync_bn, progress=not args.no_progress, tensorboard=not args.no_tensorboard,
        device=args.device, grad_probe=args.grad_probe)


# ---------------------------------------------------------------------------------------------------- adapters
def _build_model(full_cfg):
    from cmfiou_core.model.detector import build_model
    return build_model(full_cfg)


def _data_section(full_cfg) -> Dict[str, Any]:
    """The YAML ``data:`` section without ``optimization`` (which belongs to the trainer)."""
    from cmfiou_core.model.model_config import data_section
    return data_section(full_cfg.data)


def _build_train_data(full_cfg, data_dir: str, seed: int, no_pseudo: bool) -> Tuple[Any, Callable]:
    """(``kitti.build_train_dataset(...)``, ``collate_batch``).  The dataset draws its augmentation from
    ``default_rng([seed, epoch, index])``; the engine's SeededDataset calls ``set_epoch`` inside the workers.
    ``no_pseudo``: the dataset's raw-only mode (no depth completion, empty ``points_mm``)."""
    from cmfiou_core.data.collate import collate_batch
    from cmfiou_core.data.kitti import build_train_dataset
    ds = build_train_dataset(data_dir, _data_section(full_cfg), split="train", training=True,
                             use_pseudo=not no_pseudo, seed=seed)
    return ds, collate_batch


def _per_sample(x, counts, B: int, device):
    """Per-sample (N_b, 8) float32 tensors on ``device`` from a list of arrays/tensors or a batched (N, 9) tensor
    ``[b, x, ...]`` (``counts``: optional per-sample row counts)."""
    import numpy as np
    import torch
    if isinstance(x, (list, tuple)):
        return [torch.from_numpy(np.ascontiguousarray(p, dtype=np.float32)).to(device, non_blocking=True)
                if isinstance(p, np.ndarray) else p.to(device=device, dtype=torch.float32) for p in x]
    x = x.to(device, non_blocking=True)
    if counts is not None and int(counts.sum()) == x.shape[0]:
        return [p[:, 1:] for p in torch.split(x, [int(c) for c in counts.tolist()])]
    b = x[:, 0].long()
    return [x[b == i, 1:] for i in range(B)]


def _make_prepare_fn(full_cfg, no_pseudo: bool) -> Callable:
    """``collate_batch`` output (CPU) -> the detector's batch dict on the device (voxelisation there, by
    ``model.detector.prepare_batch``).  ``no_pseudo``: the pseudo branch gets an empty (0, 8) cloud per frame."""
    import numpy as np
    import torch
    from cmfiou_core.model.detector import prepare_batch
    from cmfiou_core.model.voxelize import Voxelizer
    mc = full_cfg.model
    vox = Voxelizer(mc.voxel_size, mc.point_cloud_range, mc.max_points_per_voxel, mc.max_voxels(True))

    def _np(x):
        return x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)

    def prepare(batch: Dict[str, Any], device):
        B = int(batch["batch_size"])
        raw = _per_sample(batch["points"], batch.get("num_points"), B, device)
        if no_pseudo:
            raw = [p[p[:, 7] != 1] for p in raw]  # raw clouds carry flag 2 only; be safe
            pseudo = [torch.zeros((0, 8), dtype=torch.float32, device=device) for _ in range(B)]
        else:
            pseudo = _per_sample(batch["points_mm"], batch.get("num_points_mm"), B, device)
        gt = batch["gt_boxes"]
        if isinstance(gt, torch.Tensor):  # padded (B, M, 8): class id 0 = padding
            gt = [g[g[:, 7] > 0] for g in gt]
        aug = _np(batch["aug_param"]).reshape(B, -1)
        if batch.get("local_trans") is not None:  # global shift applied after the world transforms: undo it too
            aug = np.concatenate([aug[:, :3], np.asarray(batch["local_trans"], np.float32).reshape(B, 3)], 1)
        out = prepare_batch(raw, pseudo, batch["calib"], mc, image_shapes=_np(batch["image_shape"]),
                            training=True, aug_params=aug, gt_boxes=list(gt),
                            device=device, voxelizer=vox)
        out["frame_id"] = batch.get("frame_id")
        return out

    return prepare


def _build_eval_fn(full_cfg, data_dir: str, no_pseudo: bool) -> Callable:
    """``eval_fn(model, epoch) -> {metric: value}``: ``cmfiou_core.data.kitti.make_eval_fn`` on the ``val`` split."""
    from cmfiou_core.data.kitti import make_eval_fn
    return make_eval_fn(full_cfg, data_dir, split="val", use_pseudo=not no_pseudo)


def _toy_setup():
    from cmfiou_core.train.toy import ToyPointDataset, ToyPointNet, toy_collate
    return ToyPointNet(), ToyPointDataset(256), toy_collate


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    t_origin = time.time()
    args = build_parser().parse_args(argv)
    if args.config is None and not args.toy:
        args.config = default_config()
    from cmfiou_core.train import (Trainer, cleanup_distributed, export_fp16, init_distributed, load_model_weights,
                                   seed_everything)

    dist_info = init_distributed(args.device)
    logging.basicConfig(level=logging.INFO if dist_info.is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.toy:
            opt = dict(OPT_DEFAULTS, epochs=2, batch_size_per_gpu=8, lr=0.01, num_workers=0)
            tcfg = make_train_config(args, opt)
            seed_everything(tcfg.seed)
            model, train_set, collate = _toy_setup()
            prepare, eval_fn, config = None, None, {"toy": True}
            find_unused = args.find_unused == "on"
        else:
            if not args.data:
                print("cmfiou-train: --data is required (or --toy)", file=sys.stderr)
                return 2
            from cmfiou_core.model.model_config import load_config
            try:
                full = load_config(args.config, args.overrides)
            except ConfigError as e:
                print(f"cmfiou-train: {e}", file=sys.stderr)
                return 2
            tcfg = make_train_config(args, full.optimization)
            seed_everything(tcfg.seed)
            if dist_info.device.type == "cpu":
                import torch
                torch.set_num_threads(1)  # spconv's CPU path is only correct with one thread (docs/DEVELOPING.md)
                from cmfiou_core.model.spconv_compat import enable_cpu_backward
                enable_cpu_backward()  # spconv's CPU backward asks torch.cuda for a stream otherwise
            model = _build_model(full)
            algo = args.spconv_algo
            if algo == "auto":
                algo = "implicit_gemm" if dist_info.device.type == "cuda" else "native"
            if algo != "native":
                if dist_info.device.type != "cuda":
                    raise SystemExit(f"--spconv-algo {algo} needs CUDA (spconv's CPU build has only native)")
                from cmfiou_core.model.spconv_compat import set_algorithm
                n = set_algorithm(model, algo)
                if dist_info.is_main:
                    log.info("training with spconv %s (%d convolutions; inference runs Native)", algo, n)
            train_set, collate = _build_train_data(full, args.data, tcfg.seed, args.no_pseudo)
            prepare = _make_prepare_fn(full, args.no_pseudo)
            eval_fn = _build_eval_fn(full, args.data, args.no_pseudo) if args.eval_every > 0 else None
            config = {k: v for k, v in full.raw.items() if k != "_source"}
            find_unused = args.find_unused != "off"
        tcfg.find_unused_parameters = find_unused
        if args.init:
            res = load_model_weights(model, args.init, strict=False)
            if dist_info.is_main:
                log.info("initialised from %s (missing %d, unexpected %d keys)", args.init, len(res.missing_keys),
                         len(res.unexpected_keys))
        meta = {"argv": list(sys.argv if argv is None else argv), "no_pseudo": bool(args.no_pseudo),
                "data": args.data or "", "config_path": args.config}
        trainer = Trainer(model, train_set, tcfg, collate_fn=collate, prepare_fn=prepare, eval_fn=eval_fn,
                          config=config, meta=meta, dist_info=dist_info, time_origin=t_origin)
        result = trainer.fit(resume=args.resume)
        trainer.close()
        if dist_info.is_main:
            print(f"cmfiou-train: {result.status} at epoch {result.epoch}, iteration {result.it}; "
                  f"checkpoint {result.checkpoint}", flush=True)
            if args.export_fp16 and result.checkpoint:
                s = export_fp16(result.checkpoint, args.export_fp16)
                print(f"cmfiou-train: fp16 export {s['path']} ({s['size_mb']:.2f} MB)", flush=True)
        return 0
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    sys.exit(main())
