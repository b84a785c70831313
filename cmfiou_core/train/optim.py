"""Adam one-cycle optimisation (the official ``OPTIMIZATION`` block, ``adam_onecycle``).

Semantics reproduced (OpenPCDet ``adam_onecycle`` = fastai ``OptimWrapper`` + ``OneCycle``):

* Adam with betas ``(0.9, 0.99)``, eps 1e-8, and *decoupled* ("true") weight decay 0.01 applied to **every** parameter
  (BN and biases included): before the Adam update each parameter is scaled by ``1 - lr * wd``.  That is exactly
  :class:`torch.optim.AdamW`, so a single AdamW param group is used.
* One-cycle schedule over ``total_steps`` optimizer iterations, stepped once per iteration *before* the optimizer step
  of that iteration (iteration ``i`` runs with the values at position ``i``):

  - phase 1, ``0 <= i < n1`` with ``n1 = int(total_steps * pct_start)``: cosine from ``lr / div_factor`` up to ``lr``;
    beta1 (the "momentum") cosine from ``moms[0]`` down to ``moms[1]``;
  - phase 2, ``n1 <= i <= total_steps``: cosine from ``lr`` down to ``lr / div_factor / final_div_factor``; beta1 back up
    from ``moms[1]`` to ``moms[0]``.

  ``cos_anneal(a, b, p) = b + (a - b) / 2 * (1 + cos(pi * p))``, ``p`` the fraction of the phase elapsed.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["cos_anneal", "build_adam_onecycle", "OneCycle"]


def cos_anneal(start: float, end: float, pct: float) -> float:
    """Cosine interpolation from ``start`` (pct=0) to ``end`` (pct=1)."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1.0)


def build_adam_onecycle(params: Union[nn.Module, Iterable], lr: float, *, weight_decay: float = 0.01,
                        betas: Sequence[float] = (0.9, 0.99), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over all trainable parameters (one group, decay on all of them).

    The initial lr/beta1 are placeholders; :class:`OneCycle` overwrites them on construction and at every step.
    """
    if isinstance(params, nn.Module):
        params = [p for p in params.parameters() if p.requires_grad]
    else:
        params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("build_adam_onecycle: no trainable parameters")
    if lr <= 0 or weight_decay < 0:
        raise ValueError(f"build_adam_onecycle: lr must be > 0 and weight_decay >= 0, got {lr}, {weight_decay}")
    b1, b2 = (float(b) for b in betas)
    return torch.optim.AdamW(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay)


class OneCycle:
    """Per-iteration one-cycle LR + beta1 schedule driving an Adam-family optimizer.

    ``step(it)`` applies the values for iteration ``it`` to every param group; ``step()`` advances by one.
    ``set_progress(f)`` (``f`` in [0, 1], used by time-budgeted training) applies the values at fraction ``f`` of the
    cycle; ``f * total_steps`` is then used as a (fractional) iteration.  The schedule is a pure function of position,
    so ``state_dict`` only records the hyper-parameters and the last position.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, lr_max: float, *,
                 div_factor: float = 10.0, final_div_factor: float = 1e4, pct_start: float = 0.4,
                 moms: Sequence[float] = (0.95, 0.85)):
        if total_steps < 1:
            raise ValueError(f"OneCycle: total_steps must be >= 1, got {total_steps}")
        if not 0.0 <= pct_start <= 1.0:
            raise ValueError(f"OneCycle: pct_start must be in [0, 1], got {pct_start}")
        if lr_max <= 0 or div_factor <= 0 or final_div_factor <= 0:
            raise ValueError("OneCycle: lr_max, div_factor and final_div_factor must be > 0")
        if len(moms) != 2:
            raise ValueError(f"OneCycle: moms must be (high, low), got {moms!r}")
        self.optimizer = optimizer
        self.total_steps = int(total_steps)
        self.lr_max = float(lr_max)
        self.div_factor = float(div_factor)
        self.final_div_factor = float(final_div_factor)
        self.pct_start = float(pct_start)
        self.moms = (float(moms[0]), float(moms[1]))
        self.last_it: float = 0
        self.step(0)

    # ----------------------------------------------------------------------------------------------- schedule values
    @property
    def phase1_end(self) -> int:
        return int(self.total_steps * self.pct_start)

    @property
    def lr_start(self) -> float:
        return self.lr_max / self.div_factor

    @property
    def lr_end(self) -> float:
        return self.lr_max / self.div_factor / self.final_div_factor

    def values_at(self, it: float) -> Tuple[float, float]:
        """(lr, beta1) at iteration ``it`` (may be fractional; clamped to [0, total_steps])."""
        it = min(max(float(it), 0.0), float(self.total_steps))
        n1 = self.phase1_end
        if it < n1:
            p = it / n1
            return cos_anneal(self.lr_start, self.lr_max, p), cos_anneal(self.moms[0], self.moms[1], p)
        span = self.total_steps - n1
        p = (it - n1) / span if span > 0 else 1.0
        return cos_anneal(self.lr_max, self.lr_end, p), cos_anneal(self.moms[1], self.moms[0], p)

    def lr_at(self, it: float) -> float:
        return self.values_at(it)[0]

    def mom_at(self, it: float) -> float:
        return self.values_at(it)[1]

    # ------------------------------------------------------------------------------------------------------ stepping
    def _apply(self, lr: float, mom: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr
            if "betas" in g:
                g["betas"] = (mom, g["betas"][1])
            elif "momentum" in g:
                g["momentum"] = mom

    def step(self, it: Optional[float] = None) -> Tuple[float, float]:
        """Apply the values of iteration ``it`` (default: previous position + 1); returns (lr, beta1)."""
        self.last_it = self.last_it + 1 if it is None else it
        lr, mom = self.values_at(self.last_it)
        self._apply(lr, mom)
        return lr, mom

    def set_progress(self, fraction: float) -> Tuple[float, float]:
        """Apply the values at ``fraction`` of the whole cycle (0 = start, 1 = end)."""
        return self.step(min(max(float(fraction), 0.0), 1.0) * self.total_steps)

    @property
    def progress(self) -> float:
        return float(self.last_it) / self.total_steps

    def get_last_lr(self):
        return [g["lr"] for g in self.optimizer.param_groups]

    # --------------------------------------------------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        return {"type": "adam_onecycle", "total_steps": self.total_steps, "lr_max": self.lr_max,
                "div_factor": self.div_factor, "final_div_factor": self.final_div_factor,
                "pct_start": self.pct_start, "moms": list(self.moms), "last_it": float(self.last_it)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("type", "adam_onecycle") != "adam_onecycle":
            raise ValueError(f"OneCycle: cannot load scheduler state of type {state.get('type')!r}")
        self.total_steps = int(state["total_steps"])
        self.lr_max = float(state["lr_max"])
        self.div_factor = float(state["div_factor"])
        self.final_div_factor = float(state["final_div_factor"])
        self.pct_start = float(state["pct_start"])
        self.moms = (float(state["moms"][0]), float(state["moms"][1]))
        last = float(state["last_it"])
        self.step(int(last) if last.is_integer() else last)
