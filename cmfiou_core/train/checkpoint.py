"""Training checkpoints in our format, loadable with ``torch.load(..., weights_only=True)``.

Layout (a plain dict; only tensors and primitive containers inside)::

    {'model_state':     unwrapped model state_dict (no 'module.' prefix), CPU tensors,
     'optimizer_state': optimizer.state_dict() (CPU tensors) or None (exported weights),
     'scheduler_state': OneCycle.state_dict() or None,
     'epoch':           number of fully completed epochs,
     'it':              number of completed optimizer iterations (global),
     'config':          the YAML config dict the model was built from (primitives only),
     'meta':            {'format': 'cmfiou-ckpt-v1', 'iters_per_epoch', 'world_size', 'batch_size', 'seed',
                         'rng': [per-rank RNG states], 'scaler_state', 'time_used_s', 'torch', 'created', ...}}

Writes are atomic (temporary file + ``os.replace``) so an interrupted save never leaves a truncated checkpoint.
"""
from __future__ import annotations

import datetime
import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np
import torch
from torch import nn

__all__ = ["CKPT_FORMAT", "CKPT_KEYS", "unwrap_model", "to_primitive", "state_to_cpu", "rng_state", "set_rng_state",
           "atomic_save", "save_checkpoint", "load_checkpoint", "load_model_weights", "link_or_copy"]

CKPT_FORMAT = "cmfiou-ckpt-v1"
CKPT_KEYS = ("model_state", "optimizer_state", "scheduler_state", "epoch", "it", "config", "meta")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel wrappers (state_dict keys then carry no 'module.' prefix)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def to_primitive(obj: Any) -> Any:
    """Recursively convert to weights_only-safe values: dict/list/tuple/str/int/float/bool/None/tensor.

    numpy arrays become tensors, numpy scalars Python numbers, paths strings; other objects their ``str``.
    """
    if obj is None or type(obj) in (bool, int, float, str):
        return obj
    for t in (bool, int, float, str):  # subclasses (TorchVersion, IntEnum, ...) are not weights_only-safe
        if isinstance(obj, t):
            return t(obj)
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Mapping):
        return {(k if isinstance(k, (str, int)) else str(k)): to_primitive(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        out = [to_primitive(v) for v in obj]
        return tuple(out) if isinstance(obj, tuple) else out
    if isinstance(obj, torch.dtype):
        return str(obj)
    return str(obj)


def state_to_cpu(obj: Any) -> Any:
    """Detached CPU copies of every tensor in a (nested) state dict; containers preserved."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: state_to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [state_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(state_to_cpu(v) for v in obj)
    return obj


# ---------------------------------------------------------------------------------------------------------- RNG state
def rng_state(device: Optional[torch.device] = None) -> Dict[str, Any]:
    """Python, numpy, torch CPU and (if ``device`` is CUDA) CUDA RNG states, as weights_only-safe values."""
    py = random.getstate()
    npst = np.random.get_state()
    st = {
        "python": {"version": py[0], "state": torch.tensor(py[1], dtype=torch.int64), "gauss": py[2]},
        "numpy": {"name": npst[0], "keys": torch.from_numpy(npst[1].astype(np.int64)), "pos": int(npst[2]),
                  "has_gauss": int(npst[3]), "cached_gaussian": float(npst[4])},
        "torch": torch.get_rng_state(),
        "cuda": None,
    }
    if device is not None and device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def set_rng_state(st: Mapping[str, Any], device: Optional[torch.device] = None) -> None:
    py = st["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    n = st["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(st["torch"])
    if st.get("cuda") is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(st["cuda"], device)


# --------------------------------------------------------------------------------------------------------- save/load
def atomic_save(obj: Any, path: Union[str, Path]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def link_or_copy(src: Union[str, Path], dst: Union[str, Path]) -> None:
    """Point ``dst`` at ``src``'s content atomically (hard link when possible, else copy)."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def save_checkpoint(path: Union[str, Path], model: nn.Module, optimizer=None, scheduler=None, *, epoch: int = 0,
                    it: int = 0, config: Optional[Mapping] = None, meta: Optional[Mapping] = None) -> Path:
    ckpt = {
        "model_state": state_to_cpu(dict(unwrap_model(model).state_dict())),
        "optimizer_state": state_to_cpu(optimizer.state_dict()) if optimizer is not None else None,
        "scheduler_state": to_primitive(scheduler.state_dict()) if scheduler is not None else None,
        "epoch": int(epoch),
        "it": int(it),
        "config": to_primitive(dict(config or {})),
        "meta": to_primitive({"format": CKPT_FORMAT, "torch": torch.__version__,
                              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                              **dict(meta or {})}),
    }
    return atomic_save(ckpt, path)


def load_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """``torch.load(weights_only=True)`` plus a format check; raises ValueError with the file name on bad input."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise ValueError(f"{path}: not a loadable weights-only checkpoint: {e}") from e
    if not isinstance(ckpt, dict) or "model_state" not in ckpt:
        raise ValueError(f"{path}: not a cmfiou checkpoint (expected a dict with 'model_state')")
    return ckpt


def load_model_weights(model: nn.Module, ckpt_or_path: Union[str, Path, Mapping], strict: bool = True):
    """Load ``model_state`` of a checkpoint (or a checkpoint path) into ``model`` (wrappers stripped).

    Dtypes are converted by ``load_state_dict`` (fp16 exports load into fp32 models).
    """
    ckpt = load_checkpoint(ckpt_or_path) if isinstance(ckpt_or_path, (str, Path)) else ckpt_or_path
    state = ckpt["model_state"]
    if any(k.startswith("module.") for k in state):
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    return unwrap_model(model).load_state_dict(state, strict=strict)


def check_resumable(ckpt: Mapping, path, iters_per_epoch: int, total_iters: int) -> None:
    """A checkpoint an exact continuation can start from: optimizer and scheduler state present, the same
    iterations per epoch (dataset, batch size, process count) and the same schedule length (epochs); ValueError
    naming the difference otherwise."""
    meta = ckpt.get("meta") or {}
    if ckpt.get("optimizer_state") is None or ckpt.get("scheduler_state") is None:
        raise ValueError(f"{path}: has no optimizer/scheduler state (an exported checkpoint?); use it as --init")
    ipe = meta.get("iters_per_epoch")
    if ipe != iters_per_epoch:
        raise ValueError(f"{path}: saved with {ipe} iterations/epoch, this run has {iters_per_epoch} "
                         "(dataset, batch size or process count changed); cannot resume exactly")
    sched = ckpt["scheduler_state"]
    if int(sched["total_steps"]) != total_iters:
        raise ValueError(f"{path}: schedule has {sched['total_steps']} iterations, this run {total_iters} "
                         f"(--epochs differs from the original {int(sched['total_steps']) // ipe})")
