"""Checkpoints: the one place that knows foreign layouts.

Formats read (always with ``torch.load(..., weights_only=True)``; files that need pickled objects are refused):
- OpenPCDet / official CMF-IOU: ``{'epoch', 'it', 'model_state', 'optimizer_state', 'version'}`` (legacy or zip
  serialization); ``model_state`` is the unwrapped ``state_dict`` (a ``module.`` prefix from DDP is stripped);
- a bare ``state_dict`` (mapping key -> tensor);
- ours (:func:`save_checkpoint` here and ``cmfiou_core.train.checkpoint.save_checkpoint``, same layout):
  ``{'model_state', 'optimizer_state', 'epoch', 'it', 'config', 'meta': {'format': 'cmfiou-ckpt-v1', ...}}``, where
  ``config`` is the parsed YAML (plain types) and ``meta`` plain types (a top-level ``'format'`` is accepted too).

Conversions on load: spconv-1 sparse-conv weights ``(*k, C_in, C_out)`` are permuted to spconv-2 KRSC
``(C_out, *k, C_in)`` when the shape says so; half / bfloat16 floating tensors are cast to the model's dtype;
``num_batches_tracked`` / ``global_step`` are cast to int64.
"""
from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

log = logging.getLogger(__name__)

FORMAT_PREFIX = "cmfiou-ckpt-"
OUR_FORMAT = FORMAT_PREFIX + "v1"
IOU_BRANCH_PREFIXES = ("roi_head.iou_layers.",)   # keys that an official checkpoint cannot have


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read or does not fit the model (the message lists the offending keys)."""


@dataclass
class LoadReport:
    source_format: str = "unknown"
    missing_iou_branch: List[str] = field(default_factory=list)   # allowed missing keys (left at their init values)
    converted_spconv1: List[str] = field(default_factory=list)
    cast_dtype: List[str] = field(default_factory=list)
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def missing_iou_keys(self) -> List[str]:
        """Alias of ``missing_iou_branch`` (name used by the pipeline)."""
        return self.missing_iou_branch


# ---------------------------------------------------------------------------------------------- reading
def read_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """``torch.load`` with ``weights_only=True`` only. Raises CheckpointError with an explanation otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(str(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refusing to load: the file contains pickled Python objects that torch.load(weights_only=True) "
            f"does not allow ({str(e).splitlines()[0] if str(e) else type(e).__name__}). Unpickling arbitrary objects "
            "can execute code from the file, so untrusted checkpoints are never unpickled. If you trust the file, "
            "re-save its tensors (e.g. {'model_state': sd}) in a trusted environment and load that.") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint: {e}") from None
    if isinstance(obj, Mapping):
        return dict(obj)
    raise CheckpointError(f"{path}: top level is {type(obj).__name__}, expected a mapping")


def extract_state_dict(obj: Mapping[str, Any]) -> Tuple[Dict[str, torch.Tensor], str, Dict[str, Any]]:
    """-> (state_dict, format name, meta) for our format, the OpenPCDet format or a bare state_dict."""
    meta_in = obj.get("meta") if isinstance(obj.get("meta"), Mapping) else {}
    declared = [str(f) for f in (obj.get("format"), meta_in.get("format")) if f is not None]
    other = [f for f in declared if f.startswith(FORMAT_PREFIX) and f != OUR_FORMAT]
    if other:
        raise CheckpointError(f"checkpoint format {other[0]!r} is not the format this code reads ({OUR_FORMAT!r}): "
                              "written by a different version of cmfiou")
    if OUR_FORMAT in declared:
        fmt = "cmfiou"
        state = obj.get("model_state")
        meta = {k: obj[k] for k in ("meta", "config", "epoch", "it") if k in obj}
    elif "model_state" in obj:
        fmt = "openpcdet"
        state = obj["model_state"]
        meta = {k: obj[k] for k in ("epoch", "it", "version") if k in obj}
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        fmt, state, meta = "state_dict", obj, {}
    else:
        raise CheckpointError(f"checkpoint has no 'model_state' and is not a state_dict (top-level keys: "
                              f"{sorted(map(str, obj))[:12]})")
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("checkpoint 'model_state' must map keys to tensors")
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, fmt, meta


# ---------------------------------------------------------------------------------------------- conversion
def _sparse_conv_weight_keys(model: nn.Module) -> set:
    import spconv.pytorch as spconv

    keys = set()
    for name, mod in model.named_modules():
        if isinstance(mod, spconv.conv.SparseConvolution):
            keys.add(f"{name}.weight" if name else "weight")
    return keys


def convert_state_dict(model: nn.Module, state: Dict[str, torch.Tensor], report: LoadReport) -> Dict[str, torch.Tensor]:
    """spconv-1 -> spconv-2 weight layout, dtype casts (fp16/bf16 -> model dtype, counters -> int64)."""
    target = model.state_dict()
    sp_keys = _sparse_conv_weight_keys(model)
    out = {}
    for k, v in state.items():
        t = target.get(k)
        if t is not None:
            if k in sp_keys and v.shape != t.shape and v.dim() == t.dim() and v.dim() in (4, 5):
                cand = v.permute(v.dim() - 1, *range(v.dim() - 2), v.dim() - 2)   # (*k, Cin, Cout) -> (Cout, *k, Cin)
                if cand.shape == t.shape:
                    v = cand.contiguous()
                    report.converted_spconv1.append(k)
            if v.dtype != t.dtype:
                if t.dtype.is_floating_point and v.dtype.is_floating_point:
                    report.cast_dtype.append(k)
                    v = v.to(t.dtype)
                elif t.dtype == torch.int64 and (k.endswith("num_batches_tracked") or k == "global_step"):
                    v = v.to(torch.int64)
        out[k] = v
    return out


# ---------------------------------------------------------------------------------------------- loading
def _is_iou_branch(k: str) -> bool:
    return k.startswith(IOU_BRANCH_PREFIXES)


def load_official(model: nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True,
                  report: Optional[LoadReport] = None) -> LoadReport:
    """Load an official-layout state_dict into ``model``.

    - official-layout config (no IoU branch): every key must match (``strict=True``);
    - our config with the IoU branch: only the IoU-branch keys (``roi_head.iou_layers.*``) may be missing; they are
      returned in ``report.missing_iou_branch`` and logged;
    - any other missing or unexpected key, or a shape mismatch, raises CheckpointError listing them.
    ``strict=False`` tolerates missing / unexpected keys (reported, logged), never shape mismatches.
    """
    report = report or LoadReport(source_format="official")
    state = convert_state_dict(model, dict(state), report)
    target = model.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    allowed = [k for k in missing if _is_iou_branch(k)]
    other_missing = [k for k in missing if not _is_iou_branch(k)]
    bad_shape = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(target[k].shape)}" for k in state
                 if k in target and state[k].shape != target[k].shape]
    if bad_shape:
        raise CheckpointError("checkpoint shapes do not fit the model:\n  " + "\n  ".join(bad_shape[:50]))
    if strict and (other_missing or unexpected):
        msg = []
        if other_missing:
            msg.append(f"missing keys ({len(other_missing)}): " + ", ".join(other_missing[:50]))
        if unexpected:
            msg.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:50]))
        raise CheckpointError("checkpoint does not fit the model:\n  " + "\n  ".join(msg))
    model.load_state_dict({k: v for k, v in state.items() if k in target}, strict=False)
    report.missing_iou_branch = allowed
    if allowed:
        log.warning("checkpoint has no IoU-branch weights; %d keys left at initialisation: %s", len(allowed),
                    ", ".join(sorted({k.rsplit('.', 2)[0] for k in allowed})))
    if not strict and (other_missing or unexpected):
        log.warning("non-strict load: %d missing, %d unexpected keys", len(other_missing), len(unexpected))
    if report.converted_spconv1:
        log.info("converted %d spconv-1 weights to the spconv-2 layout", len(report.converted_spconv1))
    if report.cast_dtype:
        log.info("cast %d tensors to the model dtype", len(report.cast_dtype))
    return report


def load_checkpoint(path: Union[str, Path], model: Optional[nn.Module] = None, strict: bool = True,
                    map_location: Union[str, torch.device] = "cpu") -> Tuple[Dict[str, torch.Tensor], LoadReport]:
    """Read any supported file; if ``model`` is given, load it (see :func:`load_official`). Returns the converted
    state_dict and the report (``report.meta`` holds our ``config``/``meta`` or OpenPCDet ``epoch``/``version``)."""
    obj = read_checkpoint(path, map_location)
    try:
        state, fmt, meta = extract_state_dict(obj)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    report = LoadReport(source_format=fmt, meta=meta)
    if model is not None:
        if fmt == "cmfiou" and isinstance(meta.get("config"), Mapping) and meta["config"].get("model") is not None \
                and getattr(model, "cfg", None) is not None:
            check_stored_config(meta["config"], model.cfg, path, strict)
        load_official(model, state, strict=strict, report=report)
    return state, report


def check_stored_config(stored: Mapping[str, Any], model_cfg, path: Union[str, Path], strict: bool = True) -> None:
    """The config stored in one of our checkpoints must agree with the model's on every setting the weights depend
    on (``model_config.weights_signature``: geometry, anchors, layer sizes); a disagreement is a CheckpointError naming
    the keys (``strict=False``: a warning). A stored config this code can no longer parse is reported the same way."""
    from ..config import ConfigError
    from .model_config import config_from_dict, weights_signature

    try:
        theirs = weights_signature(config_from_dict(stored, f"{path} (stored config)").model)
    except ConfigError as e:
        msg = f"{path}: the config stored in the checkpoint does not validate with this code: {e}"
    else:
        ours = weights_signature(model_cfg)
        diff = [f"{k}: checkpoint {theirs.get(k)!r} vs model {ours.get(k)!r}" for k in sorted(set(ours) | set(theirs))
                if theirs.get(k) != ours.get(k)]
        if not diff:
            return
        msg = (f"{path}: the checkpoint was trained with a different model config ({len(diff)} setting(s) the "
               "weights depend on differ):\n  " + "\n  ".join(diff[:20]))
    if strict:
        raise CheckpointError(msg)
    log.warning("%s (non-strict load: continuing)", msg)


def save_checkpoint(path: Union[str, Path], model: nn.Module, config: Optional[Mapping[str, Any]] = None,
                    meta: Optional[Mapping[str, Any]] = None, optimizer_state: Optional[Mapping] = None,
                    epoch: Optional[int] = None, it: Optional[int] = None) -> Path:
    """Our format (the trainer's layout, ``meta.format == 'cmfiou-ckpt-v1'``), loadable with ``weights_only=True``
    (``config`` and ``meta`` are reduced to plain types). Written to a temporary file first and renamed, so a crash
    never leaves a truncated checkpoint. The trainer uses ``cmfiou_core.train.checkpoint.save_checkpoint``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    m = model.module if hasattr(model, "module") else model
    obj: Dict[str, Any] = {"model_state": {k: v.detach().cpu() for k, v in m.state_dict().items()},
                           "optimizer_state": optimizer_state, "epoch": int(epoch or 0), "it": int(it or 0),
                           "config": _plain(dict(config or {})),
                           "meta": {**_plain(dict(meta or {})), "format": OUR_FORMAT}}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, str(tmp))
    tmp.replace(path)
    return path


def _plain(x):
    """Drop non-plain values (only dict/list/str/int/float/bool/None survive) so the file stays weights_only-safe."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items() if not str(k).startswith("_")}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    return str(x)
