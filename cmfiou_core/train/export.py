"""fp16 export of a training checkpoint's weights for distribution (demo checkpoint).

The result keeps our checkpoint layout (``model_state``, ``optimizer_state=None``, ``scheduler_state=None``, ``epoch``,
``it``, ``config``, ``meta`` with ``meta['export'] = 'fp16'``) so every loader treats it like a training checkpoint;
``model.load_state_dict`` casts the fp16 tensors back to the model's fp32 parameters.  Floating tensors become fp16
except BatchNorm running statistics (``running_mean``/``running_var``, kept fp32: variances can underflow fp16) and
any key matching ``keep_fp32``; integer tensors (``num_batches_tracked``, ``global_step``) are unchanged.

CLI: ``python -m cmfiou_core.train.export CKPT OUT [--max-mb 40]``.
"""
from __future__ import annotations

import argparse
import fnmatch
import sys
from pathlib import Path
from typing import Iterable, Optional, Union

import torch

from ..cli import report_errors
from .checkpoint import CKPT_FORMAT, atomic_save, load_checkpoint, to_primitive

__all__ = ["export_fp16", "DEFAULT_KEEP_FP32"]

DEFAULT_KEEP_FP32 = ("*.running_mean", "*.running_var")


def export_fp16(ckpt_path: Union[str, Path], out_path: Union[str, Path], *, keep_fp32: Iterable[str] = DEFAULT_KEEP_FP32,
                max_mb: Optional[float] = 40.0) -> dict:
    """Write the fp16 export; returns a summary dict.  Raises ValueError when the file exceeds ``max_mb`` MB
    (1 MB = 1e6 bytes; the file is then removed) or when a weight does not fit fp16 (|w| > 65504)."""
    ckpt = load_checkpoint(ckpt_path)
    keep = tuple(keep_fp32)
    state, n_half, n_kept, n_other = {}, 0, 0, 0
    for k, v in ckpt["model_state"].items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{ckpt_path}: model_state[{k!r}] is not a tensor")
        if v.is_floating_point() and not any(fnmatch.fnmatchcase(k, p) for p in keep):
            if v.numel() and float(v.abs().max()) > torch.finfo(torch.float16).max:
                raise ValueError(f"{k}: values exceed the fp16 range; add it to keep_fp32")
            state[k] = v.detach().to(torch.float16).contiguous().clone()
            n_half += v.numel()
        else:
            state[k] = v.detach().contiguous().clone()
            n_kept += v.numel() if v.is_floating_point() else 0
            n_other += 0 if v.is_floating_point() else v.numel()
    meta = dict(ckpt.get("meta") or {})
    for k in ("rng", "scaler_state", "train_config"):  # training-only state
        meta.pop(k, None)
    meta.update(format=CKPT_FORMAT, export="fp16", source=str(Path(ckpt_path).name))
    out = {"model_state": state, "optimizer_state": None, "scheduler_state": None,
           "epoch": int(ckpt.get("epoch", 0)), "it": int(ckpt.get("it", 0)),
           "config": to_primitive(ckpt.get("config") or {}), "meta": to_primitive(meta)}
    out_path = atomic_save(out, out_path)
    size_mb = out_path.stat().st_size / 1e6
    if max_mb is not None and size_mb > max_mb:
        out_path.unlink()
        raise ValueError(f"fp16 export is {size_mb:.2f} MB > limit {max_mb} MB")
    return {"path": str(out_path), "size_mb": size_mb, "fp16_params": n_half, "fp32_kept": n_kept,
            "int_values": n_other, "tensors": len(state)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Export a cmfiou checkpoint's weights as fp16 for distribution")
    ap.add_argument("checkpoint")
    ap.add_argument("out")
    ap.add_argument("--max-mb", type=float, default=40.0, help="fail if the export exceeds this size (MB, 1e6 bytes)")
    a = ap.parse_args(argv)

    def export() -> str:
        s = export_fp16(a.checkpoint, a.out, max_mb=a.max_mb)
        return f"wrote {s['path']}: {s['size_mb']:.2f} MB, {s['fp16_params']} fp16 values, {s['fp32_kept']} fp32 kept"
    return report_errors(export, (ValueError, FileNotFoundError), "export failed", 1)


if __name__ == "__main__":
    sys.exit(main())
