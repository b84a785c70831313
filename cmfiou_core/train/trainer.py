"""Model-agnostic training engine.

Contract with the model: ``model(batch)`` in train mode returns the loss (scalar tensor, mean over the frames of the
local batch) as ``(loss, tb_dict)``, ``(loss, tb_dict, disp_dict)``, ``{'loss': loss, **tb}`` or a bare tensor.
``tb_dict`` values (numbers or scalar tensors) are logged as ``train/<key>``.  If the model has
``update_global_step()`` it is called after every optimizer step (OpenPCDet convention).

Contract with the data: a map-style dataset returning per-frame samples, a ``collate_fn`` turning a list of samples
into a CPU batch (run in DataLoader workers), and a ``prepare_fn(batch, device) -> batch`` run in the training process
(default: move tensors to the device; the detector passes its voxelisation here).

Features: Adam one-cycle (per-iteration), AMP (bf16, or fp16 with GradScaler), gradient clipping, atomic checkpoints
in our weights_only format with exact resume (model/optimizer/scheduler/scaler/RNG of every rank/data position),
tqdm progress, TensorBoard + metrics.jsonl scalars, evaluation hook every N epochs, wall-clock budget
(``max_minutes``, optional time-driven schedule) and SIGTERM/SIGINT that stop cleanly and save, DDP under torchrun
(SyncBatchNorm on CUDA only, rank-0 logging/saving, unwrapped checkpoints).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import (check_resumable, link_or_copy, load_checkpoint, load_model_weights, rng_state, save_checkpoint,
                         set_rng_state)
from .control import StopSignals, TimeBudget
from .data import ResumableDistributedSampler, SeededDataset, build_train_loader, move_to_device, \
    shutdown_loader_workers
from .dist import DistInfo, all_gather_object, barrier, init_distributed, seed_everything
from .optim import OneCycle, build_adam_onecycle
from .scalars import ScalarLogger

__all__ = ["TrainConfig", "FitResult", "Trainer", "unpack_model_output"]

log = logging.getLogger("cmfiou.train")

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 2                  # per process (BATCH_SIZE_PER_GPU)
    lr: float = 0.005                    # one-cycle peak LR
    weight_decay: float = 0.01
    betas: Tuple[float, float] = (0.9, 0.99)
    moms: Tuple[float, float] = (0.95, 0.85)
    div_factor: float = 10.0
    final_div_factor: float = 1e4
    pct_start: float = 0.4
    grad_clip: float = 10.0              # <= 0 disables clipping (the norm is still logged)
    nonfinite_reports: int = 20          # skipped (non-finite gradient) steps reported by parameter name
    grad_probe: float = 0.0              # > 0: per-module forward/grad magnitudes of steps with grad norm above this
    amp: str = "off"                     # off | bf16 | fp16
    workers: int = 4
    seed: int = 0
    out_dir: str = "output/train"
    max_minutes: Optional[float] = None  # wall-clock budget, measured from ``time_origin``; stop cleanly and save
    time_schedule: bool = False          # with max_minutes: one-cycle progress = max(iterations, elapsed time) fraction
    max_iters: Optional[int] = None      # stop (and save) after this many iterations in this run (smoke tests)
    eval_every: int = 0                  # epochs; 0 = never (the last epoch is always evaluated when > 0)
    log_every: int = 20                  # iterations between scalar logs
    save_every_minutes: float = 0.0      # extra mid-epoch 'latest.pth' saves; 0 = only at epoch ends / stop
    keep_last: int = 5                   # epoch checkpoints kept
    drop_last: bool = False
    sync_bn: bool = True                 # SyncBatchNorm under DDP (CUDA only)
    find_unused_parameters: bool = False
    progress: bool = True
    tensorboard: bool = True
    deterministic: bool = False
    device: str = "auto"                 # auto | cuda | cpu

    def validate(self) -> "TrainConfig":
        if self.epochs < 1 or self.batch_size < 1 or self.workers < 0 or self.log_every < 1 or self.keep_last < 1:
            raise ValueError(f"invalid TrainConfig: {self}")
        if self.amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)}, got {self.amp!r}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("lr must be > 0 and weight_decay >= 0")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError("max_minutes must be > 0")
        if self.max_iters is not None and self.max_iters < 1:
            raise ValueError("max_iters must be >= 1")
        if self.eval_every < 0:
            raise ValueError("eval_every must be >= 0")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        self.moms = (float(self.moms[0]), float(self.moms[1]))
        return self


@dataclass
class FitResult:
    status: str                          # completed | time_budget | signal | max_iters
    epoch: int
    it: int
    checkpoint: Optional[str]
    history: List[Dict[str, float]] = field(default_factory=list)
    evals: Dict[int, Dict[str, float]] = field(default_factory=dict)


def unpack_model_output(out: Any) -> Tuple[torch.Tensor, Dict[str, Any]]:
    if isinstance(out, Mapping):
        if "loss" not in out:
            raise TypeError("model output dict has no 'loss'")
        loss, tb = out["loss"], {k: v for k, v in out.items() if k != "loss"}
    elif isinstance(out, (tuple, list)):
        loss = out[0]
        tb = dict(out[1]) if len(out) > 1 and isinstance(out[1], Mapping) else {}
    else:
        loss, tb = out, {}
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(f"model must return a scalar loss tensor, got {type(loss).__name__}")
    tb = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in tb.items()}
    return loss.reshape(()), tb


def _to_float(v: Any) -> Optional[float]:
    try:
        if isinstance(v, torch.Tensor):
            return float(v.float().mean().item()) if v.numel() > 0 else None
        return float(v)
    except (TypeError, ValueError):
        return None


def _has_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class _Progress:
    """tqdm when available (rank 0), else a log line every ``every`` iterations."""

    def __init__(self, enabled: bool, total: int, initial: int, desc: str, every: int):
        self.bar, self.enabled, self.every, self.desc, self.n = None, enabled, every, desc, initial
        self.total = total
        if not enabled:
            return
        try:
            from tqdm import tqdm
            tty = sys.stderr.isatty()
            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=tty,
                            mininterval=0.5 if tty else 30.0, file=sys.stderr)
        except ImportError:
            self.bar = None

    def update(self, postfix: Dict[str, str]) -> None:
        self.n += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)
        elif self.n % self.every == 0 or self.n == self.total:
            log.info("%s %d/%d %s", self.desc, self.n, self.total, " ".join(f"{k}={v}" for k, v in postfix.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Trainer:
    """See the module docstring.  ``model`` must already be built (seed first with :func:`seed_everything`)."""

    def __init__(self, model: nn.Module, train_set, cfg: TrainConfig, *, collate_fn: Optional[Callable] = None,
                 prepare_fn: Optional[Callable[[Any, torch.device], Any]] = None,
                 eval_fn: Optional[Callable[[nn.Module, int], Optional[Mapping[str, float]]]] = None,
                 config: Optional[Mapping] = None, meta: Optional[Mapping] = None,
                 dist_info: Optional[DistInfo] = None, time_origin: Optional[float] = None):
        self.cfg = cfg.validate()
        self.dist = dist_info or init_distributed(cfg.device)
        self.device = self.dist.device
        self.is_main = self.dist.is_main
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_dir = self.out_dir / "ckpt"
        self.config = dict(config or {})
        self.user_meta = dict(meta or {})
        self.prepare_fn = prepare_fn or move_to_device
        self.eval_fn = eval_fn
        self.time_origin = time.time() if time_origin is None else float(time_origin)

        if self.device.type == "cuda" and not cfg.deterministic:
            torch.backends.cudnn.benchmark = True

        # ---- model (unwrapped in self.model; what is called for training in self.train_model)
        model = model.to(self.device)
        if self.dist.distributed and cfg.sync_bn and _has_bn(model):
            if self.device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            elif self.is_main:
                log.warning("SyncBatchNorm needs CUDA; BatchNorm statistics stay per-process on %s", self.device)
        self.model = model
        if self.dist.distributed:
            self.train_model: nn.Module = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.find_unused_parameters)
        else:
            self.train_model = model
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.grad_probe = None
        if cfg.grad_probe > 0:
            from .grad_probe import GradProbe
            self.grad_probe = GradProbe(self.model, cfg.grad_probe, Path(cfg.out_dir) / "grad_probe.jsonl")
        self.optimizer = build_adam_onecycle(self.params, cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)

        # ---- data
        self.train_set = SeededDataset(train_set, cfg.seed)
        self.sampler = ResumableDistributedSampler(self.train_set, num_replicas=self.dist.world_size,
                                                   rank=self.dist.rank, shuffle=True, seed=cfg.seed)
        self.loader = build_train_loader(self.train_set, cfg.batch_size, self.sampler, collate_fn=collate_fn,
                                         workers=cfg.workers, pin_memory=self.device.type == "cuda",
                                         drop_last=cfg.drop_last)
        n = self.sampler.num_samples
        self.iters_per_epoch = n // cfg.batch_size if cfg.drop_last else math.ceil(n / cfg.batch_size)
        if self.iters_per_epoch < 1:
            raise ValueError(f"dataset too small: {len(train_set)} samples for batch {cfg.batch_size} x "
                             f"{self.dist.world_size} processes")
        self.total_iters = cfg.epochs * self.iters_per_epoch
        self.scheduler = OneCycle(self.optimizer, self.total_iters, cfg.lr, div_factor=cfg.div_factor,
                                  final_div_factor=cfg.final_div_factor, pct_start=cfg.pct_start, moms=cfg.moms)

        # ---- AMP
        self.amp_dtype = AMP_DTYPES[cfg.amp]
        if cfg.amp == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise RuntimeError("amp=bf16 requested but this GPU does not support bfloat16; use --amp fp16")
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.amp == "fp16" else None

        # ---- state
        self.epoch = 0              # completed epochs
        self.it = 0                 # completed optimizer iterations
        self.time_used_before = 0.0  # training seconds of earlier (resumed) runs
        self.progress0 = 0.0        # schedule progress at (re)start, for the time-driven schedule
        self.skipped_steps = 0
        self._run_start_it = 0
        self.history: List[Dict[str, float]] = []
        self.evals: Dict[int, Dict[str, float]] = {}
        self.signals = StopSignals()
        self.budget = TimeBudget(cfg.max_minutes, self.time_origin)
        self._last_save_time = time.time()
        self._save_seconds = 0.0
        self._eval_seconds = 0.0
        self._it_time_ema: Optional[float] = None
        self.logger = ScalarLogger(self.out_dir if self.is_main else None, enabled=self.is_main,
                                   tensorboard=cfg.tensorboard)

    # ================================================================================================ checkpoints
    def _meta(self, status: str) -> Dict[str, Any]:
        rngs = all_gather_object(rng_state(self.device))  # collective: every rank calls _save
        return {**self.user_meta, "iters_per_epoch": self.iters_per_epoch, "world_size": self.dist.world_size,
                "batch_size": self.cfg.batch_size, "global_batch_size": self.cfg.batch_size * self.dist.world_size,
                "seed": self.cfg.seed, "amp": self.cfg.amp, "status": status, "rng": rngs,
                "scaler_state": self.scaler.state_dict() if self.scaler is not None else None,
                "time_used_s": self.time_used_before + (time.time() - self.time_origin),
                "skipped_steps": self.skipped_steps, "lr": self.optimizer.param_groups[0]["lr"],
                "train_config": asdict(self.cfg)}

    def save(self, name: Optional[str] = None, status: str = "running") -> Optional[Path]:
        """Collective: call on every rank.  Rank 0 writes ``ckpt/<name>`` (default by epoch) and ``ckpt/latest.pth``."""
        t0 = time.time()
        meta = self._meta(status)
        path = None
        if self.is_main:
            name = name or f"checkpoint_epoch_{self.epoch}.pth"
            path = save_checkpoint(self.ckpt_dir / name, self.model, self.optimizer, self.scheduler,
                                   epoch=self.epoch, it=self.it, config=self.config, meta=meta)
            if name != "latest.pth":
                link_or_copy(path, self.ckpt_dir / "latest.pth")
                self._prune()
            log.info("saved checkpoint %s (epoch %d, it %d)", path, self.epoch, self.it)
        barrier()
        self._save_seconds = time.time() - t0
        self._last_save_time = time.time()
        return path

    def _prune(self) -> None:
        files = sorted(self.ckpt_dir.glob("checkpoint_epoch_*.pth"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
        for p in files[:-self.cfg.keep_last]:
            p.unlink(missing_ok=True)

    def load(self, path) -> None:
        """Restore everything for an exact continuation (all ranks load the same file)."""
        ckpt = load_checkpoint(path)
        meta = ckpt.get("meta") or {}
        check_resumable(ckpt, path, self.iters_per_epoch, self.total_iters)
        sched = ckpt["scheduler_state"]
        load_model_weights(self.model, ckpt, strict=True)
        self.optimizer.load_state_dict(ckpt["optimizer_state"])
        self.scheduler.load_state_dict(sched)
        if self.scaler is not None and meta.get("scaler_state"):
            self.scaler.load_state_dict(meta["scaler_state"])
        self.epoch, self.it = int(ckpt["epoch"]), int(ckpt["it"])
        self.time_used_before = float(meta.get("time_used_s", 0.0))
        self.skipped_steps = int(meta.get("skipped_steps", 0))
        self.progress0 = self.scheduler.progress
        rngs = meta.get("rng")
        if isinstance(rngs, list) and len(rngs) == self.dist.world_size:
            set_rng_state(rngs[self.dist.rank], self.device)
        else:
            if self.is_main:
                log.warning("%s: RNG states for %s ranks, running %d; reseeding", path,
                            len(rngs) if isinstance(rngs, list) else "no", self.dist.world_size)
            seed_everything(self.cfg.seed + 1000 * self.dist.rank + self.it)
        if self.is_main:
            log.info("resumed from %s: epoch %d, it %d/%d", path, self.epoch, self.it, self.total_iters)

    # ================================================================================================ stopping
    def _elapsed(self) -> float:
        return self.budget.elapsed()

    def _budget_exhausted(self, extra: float = 0.0) -> bool:
        return self.budget.exhausted(self._it_time_ema or 0.0, self._save_seconds, extra)

    def _sync_flags(self, *flags: float) -> List[float]:
        """Sum small per-rank numbers across ranks (one collective); identity in single process."""
        if not self.dist.distributed:
            return list(flags)
        t = torch.tensor(flags, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    # ================================================================================================ training
    def _schedule(self) -> Tuple[float, float]:
        if self.cfg.time_schedule and self.budget.seconds is not None:
            t_frac = self.budget.fraction()
            f = max(self.it / self.total_iters, self.progress0 + (1.0 - self.progress0) * t_frac)
            return self.scheduler.set_progress(f)
        return self.scheduler.step(self.it)

    def train_step(self, batch) -> Dict[str, Any]:
        """One optimizer iteration on a (collated) batch.  Returns local loss/tb values and the grad norm."""
        lr, mom = self._schedule()
        batch = self.prepare_fn(batch, self.device)
        self.train_model.train()
        self.optimizer.zero_grad(set_to_none=True)
        if self.grad_probe is not None:
            self.grad_probe.start_step()
        ctx = torch.autocast(device_type=self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None \
            else contextlib.nullcontext()
        with ctx:
            out = self.train_model(batch)
        loss, tb = unpack_model_output(out)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        gnorm_v = float(gnorm)
        if self.grad_probe is not None and self.grad_probe.check(
                self.it, gnorm_v, {k: f for k, f in ((k, _to_float(v)) for k, v in tb.items()) if f is not None}):
            log.warning("iteration %d: gradient norm %.3g above the probe threshold: per-module record written to %s",
                        self.it, gnorm_v, self.grad_probe.out_file)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step itself on inf/nan gradients
            self.scaler.update()
            skipped = not math.isfinite(gnorm_v)
        elif math.isfinite(gnorm_v):  # identical on all ranks (all-reduced gradients), so ranks stay in step
            self.optimizer.step()
            skipped = False
        else:
            skipped = True
        if skipped:
            self.skipped_steps += 1
            self._report_nonfinite(loss, tb)
            self.optimizer.zero_grad(set_to_none=True)
        upd = getattr(self.model, "update_global_step", None)
        if callable(upd):
            upd()
        self.it += 1
        return {"loss": loss.detach(), "tb": tb, "grad_norm": gnorm_v, "lr": lr, "mom": mom, "skipped": skipped}

    def _report_nonfinite(self, loss: torch.Tensor, tb: Dict[str, Any]) -> None:
        """Name the parameters whose gradients are non-finite (the set upstream of the op that produced inf/NaN) for
        the first skipped steps: a warning, and one JSON line per step in ``<out>/nonfinite_steps.jsonl``."""
        if self.skipped_steps > self.cfg.nonfinite_reports or not self.is_main:
            return
        bad: Dict[str, int] = {}
        for name, p in self.model.named_parameters():
            if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                bad[name] = int((~torch.isfinite(p.grad)).sum())
        modules = sorted({n.rsplit(".", 2)[0] for n in bad})
        rec = {"it": self.it, "loss": float(loss.detach()), "n_params_nonfinite": len(bad),
               "n_params": sum(1 for _ in self.model.parameters()), "modules": modules[:80],
               "losses": {k: _to_float(v) for k, v in tb.items() if _to_float(v) is not None}}
        log.warning("iteration %d: non-finite gradients in %d parameter tensors (step skipped, %d so far); "
                    "first: %s", self.it, len(bad), self.skipped_steps, ", ".join(list(bad)[:4]))
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "nonfinite_steps.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

    def _log_iteration(self, step: Dict[str, Any], loss_mean: float, window: Dict[str, float]) -> None:
        rec = {"it": self.it, "epoch": self.epoch, "loss": loss_mean, "lr": step["lr"], "mom": step["mom"],
               "grad_norm": step["grad_norm"]}
        self.history.append(rec)
        if not self.is_main or (self.it % self.cfg.log_every != 0 and self.it != self.total_iters):
            return
        dt = max(time.perf_counter() - window["t0"], 1e-9)
        its = window["n"] / dt
        scalars = {"train/loss": loss_mean, "train/lr": step["lr"], "train/momentum": step["mom"],
                   "train/grad_norm": step["grad_norm"], "train/it_per_s": its,
                   "train/samples_per_s": its * self.cfg.batch_size * self.dist.world_size,
                   "train/data_time_s": window["data"] / max(window["n"], 1),
                   "train/skipped_steps": self.skipped_steps, "train/epoch": self.it / self.iters_per_epoch,
                   "time/elapsed_min": self._elapsed() / 60.0}
        for k, v in step["tb"].items():
            fv = _to_float(v)
            if fv is not None and f"train/{k}" not in scalars:  # rank-0 values; train/loss stays the global mean
                scalars[f"train/{k}"] = fv
        if self.scaler is not None:
            scalars["train/amp_scale"] = self.scaler.get_scale()
        if self.device.type == "cuda":
            scalars["train/mem_max_gb"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        self.logger.log(self.it, scalars)
        window.update(t0=time.perf_counter(), n=0, data=0.0)

    def _train_epoch(self) -> Optional[str]:
        """Train until the epoch ends (returns None) or a stop is requested (returns the reason)."""
        cfg, ipe = self.cfg, self.iters_per_epoch
        start = self.it - self.epoch * ipe
        self.sampler.set_epoch(self.epoch, start=start * cfg.batch_size)
        bar = _Progress(self.is_main and cfg.progress, ipe, start, f"epoch {self.epoch + 1}/{cfg.epochs}",
                        cfg.log_every)
        window = {"t0": time.perf_counter(), "n": 0, "data": 0.0}
        epoch_losses: List[float] = []
        reason = None
        t_data = time.perf_counter()
        try:
            for batch in self.loader:
                t_start = time.perf_counter()
                step = self.train_step(batch)
                hit_max = cfg.max_iters is not None and self.it - self._run_start_it >= cfg.max_iters
                local_stop = 1.0 if (self.signals.received or hit_max or
                                     (self.is_main and self._budget_exhausted())) else 0.0
                local_save = 1.0 if (self.is_main and cfg.save_every_minutes > 0 and
                                     time.time() - self._last_save_time >= cfg.save_every_minutes * 60) else 0.0
                loss_sum, stop, save, sig = self._sync_flags(float(step["loss"]), local_stop, local_save,
                                                             1.0 if self.signals.received else 0.0)
                loss_mean = loss_sum / self.dist.world_size
                now = time.perf_counter()
                it_time = now - t_data
                self._it_time_ema = it_time if self._it_time_ema is None else 0.9 * self._it_time_ema + 0.1 * it_time
                window["n"] += 1
                window["data"] += t_start - t_data
                epoch_losses.append(loss_mean)
                self._log_iteration(step, loss_mean, window)
                bar.update({"loss": f"{loss_mean:.4g}", "lr": f"{step['lr']:.2e}", "gn": f"{step['grad_norm']:.3g}"})
                if stop > 0:
                    reason = "signal" if sig > 0 else ("max_iters" if hit_max else "time_budget")
                    break
                if save > 0 and self.it < (self.epoch + 1) * ipe:
                    self.save("latest.pth")
                t_data = time.perf_counter()
        finally:
            bar.close()
        if self.is_main and epoch_losses:
            log.info("epoch %d/%d: it %d/%d, mean loss %.5g, lr %.3e, %.1f min elapsed%s", self.epoch + 1,
                     cfg.epochs, self.it, self.total_iters, sum(epoch_losses) / len(epoch_losses),
                     self.optimizer.param_groups[0]["lr"], self._elapsed() / 60,
                     f", {self.skipped_steps} skipped steps" if self.skipped_steps else "")
        return reason

    def evaluate(self) -> Optional[Dict[str, float]]:
        """Run ``eval_fn(model, epoch)`` on rank 0 (model in eval mode, no grad); other ranks wait."""
        if self.eval_fn is None:
            return None
        res = None
        t0 = time.time()
        if self.is_main:
            self.model.eval()
            try:
                with torch.no_grad():
                    res = self.eval_fn(self.model, self.epoch)
            finally:
                self.model.train()
            if res:
                res = {k: fv for k, v in dict(res).items() if (fv := _to_float(v)) is not None}
                self.evals[self.epoch] = res
                self.logger.log(self.it, {f"eval/{k}": v for k, v in res.items()})
                self.out_dir.mkdir(parents=True, exist_ok=True)
                (self.out_dir / f"eval_epoch_{self.epoch}.json").write_text(json.dumps(res, indent=1))
                log.info("eval after epoch %d: %s", self.epoch, res)
        barrier()
        self._eval_seconds = time.time() - t0
        return res

    def _eval_due(self) -> bool:
        e = self.cfg.eval_every
        return self.eval_fn is not None and e > 0 and (self.epoch % e == 0 or self.epoch == self.cfg.epochs)

    def fit(self, resume: Optional[str] = None) -> FitResult:
        if resume:
            self.load(resume)
        else:
            seed_everything(self.cfg.seed + 1000 * self.dist.rank, self.cfg.deterministic)
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "train_config.json").write_text(json.dumps(
                {"train": asdict(self.cfg), "world_size": self.dist.world_size,
                 "iters_per_epoch": self.iters_per_epoch, "total_iters": self.total_iters}, indent=1, default=str))
            log.info("training: %d epochs x %d it (batch %d x %d processes, %s), lr %.3g, amp %s, out %s",
                     self.cfg.epochs, self.iters_per_epoch, self.cfg.batch_size, self.dist.world_size, self.device,
                     self.cfg.lr, self.cfg.amp, self.out_dir)
        self._run_start_it = self.it
        self.signals.install()
        status, ckpt = "completed", None
        self._last_save_time = time.time()
        try:
            while self.epoch < self.cfg.epochs:
                (pre_stop,) = self._sync_flags(
                    1.0 if (self.signals.received or (self.is_main and self._budget_exhausted())) else 0.0)
                if pre_stop > 0:
                    status = "signal" if self.signals.received else "time_budget"
                    ckpt = self.save("latest.pth", status=status)
                    break
                reason = self._train_epoch()
                epoch_done = self.it >= (self.epoch + 1) * self.iters_per_epoch
                if epoch_done:
                    self.epoch += 1
                    ckpt = self.save(status="completed" if self.epoch == self.cfg.epochs and not reason else
                                     (reason or "running"))
                    if not reason and self._eval_due():
                        (skip,) = self._sync_flags(1.0 if self.is_main and self._budget_exhausted(
                            self._eval_seconds) and self.epoch < self.cfg.epochs else 0.0)
                        if skip > 0:
                            log.warning("skipping evaluation after epoch %d: time budget", self.epoch)
                        else:
                            self.evaluate()
                if reason and self.epoch < self.cfg.epochs:
                    status = reason
                    if not epoch_done:
                        ckpt = self.save("latest.pth", status=status)
                    break
        finally:
            self.signals.restore()
            self.logger.flush()
            shutdown_loader_workers(self.loader)
        if ckpt is None and self.is_main and (self.ckpt_dir / "latest.pth").exists():
            ckpt = self.ckpt_dir / "latest.pth"
        if self.is_main:
            log.info("training %s at epoch %d, it %d/%d (%.1f min)", status, self.epoch, self.it, self.total_iters,
                     self._elapsed() / 60)
        return FitResult(status=status, epoch=self.epoch, it=self.it,
                         checkpoint=str(self.ckpt_dir / "latest.pth") if self.is_main and ckpt else None,
                         history=self.history, evals=self.evals)

    def close(self) -> None:
        shutdown_loader_workers(self.loader)
        self.logger.close()
