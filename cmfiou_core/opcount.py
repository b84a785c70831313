"""Count the aten ops dispatched and the host<->device synchronisations of a piece of eager code, on any device.

On a GPU an eager op costs a kernel launch (a few us of host time) even when it does nothing, and a host sync
drains the whole stream; both dominate small-tensor code such as the RoI head. Neither needs a GPU to be counted:
the same Python code path runs on the CPU, so a ``TorchDispatchMode`` sees every aten op, and the ops that need a
device value on the host are recognisable by name:

- ``scalar``: ``aten._local_scalar_dense`` (``.item()``, ``bool(t)``, ``int(t)``, ``float(t)``, ``if t:``);
- ``nonzero`` / ``masked_select`` / ``masked_scatter`` / ``unique`` / ``bincount`` (CUDA needs the max) /
  ``repeat_interleave`` without ``output_size`` / ``equal``: output size or value read on the host;
- ``bool-index``: ``t[mask]`` / ``t[mask] = v`` with a bool index (a ``nonzero`` inside);
- ``d2h``: ``.cpu()``, ``.numpy()``, ``.tolist()`` (function level: on a CPU tensor they dispatch nothing, on a CUDA
  tensor they copy to the host), and ``_to_copy``/``copy_`` from a CUDA tensor to the CPU;
- ``h2d``: ``torch.tensor(data)`` / ``new_tensor`` (``aten.lift_fresh``): a pageable host->device copy, which
  PyTorch completes with a stream synchronisation when the target is CUDA.

Code marks sections with :func:`mark` (a no-op unless a counter is active); a kernel that no aten op dispatches (a
Triton launch) is counted by :func:`record_kernel`. Device-specific branches ask
:func:`cuda_path` (true inside a counter with ``cuda_paths``, the default), so a CPU count follows the CUDA code
(matrix NMS, CUDA chunk sizes). Usage::

    with OpCounter() as oc:
        model(batch)
    oc.ops      # {section: aten ops}
    oc.syncs    # [(section, kind, aten op, "file:line")]
"""
from __future__ import annotations

import contextlib
import os
import traceback
import weakref
from collections import Counter
from typing import Dict, List, Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_ACTIVE: Optional["OpCounter"] = None

_HOST_FUNCS = {"cpu": "d2h", "numpy": "d2h", "tolist": "d2h"}
_SYNC_OPS = {
    "aten._local_scalar_dense": "scalar", "aten.nonzero": "nonzero", "aten.argwhere": "nonzero",
    "aten.masked_select": "masked_select", "aten.masked_scatter": "masked_scatter", "aten.bincount": "bincount",
    "aten.unique_dim": "unique", "aten._unique": "unique", "aten._unique2": "unique",
    "aten.unique_consecutive": "unique", "aten.unique_dim_consecutive": "unique", "aten.equal": "scalar",
    "aten.lift_fresh": "h2d",
}
_INDEX_OPS = ("aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cuda_path(t: torch.Tensor) -> bool:
    """Whether code with a device-specific branch should take its CUDA branch for ``t``: ``t.is_cuda``, or a
    counter with ``cuda_paths`` is active (counting on the CPU what the GPU would run)."""
    return t.is_cuda or (_ACTIVE is not None and _ACTIVE.cuda_paths)


def mark(name: str) -> None:
    """Start section ``name`` of the active counter (no-op without one)."""
    if _ACTIVE is not None:
        _ACTIVE.section = name


def record_kernel(name: str) -> None:
    """Count one kernel that no aten op dispatches (a Triton launch) in the active counter's section (no-op without
    one): one op and one kernel, named ``name`` in ``op_names``."""
    o = _ACTIVE
    if o is not None:
        o.ops[o.section] = o.ops.get(o.section, 0) + 1
        o.kernels[o.section] = o.kernels.get(o.section, 0) + 1
        o.op_names[o.section][name] += 1


@contextlib.contextmanager
def kernel_launch(name: str):
    """``with kernel_launch(name): <launch>``: :func:`record_kernel` for a launch whose own aten ops are no part of
    the device's work (the Triton interpreter's host copies of the arguments, on the CPU): they are not counted."""
    record_kernel(name)
    o = _ACTIVE
    if o is not None:
        o._uncounted += 1
    try:
        yield
    finally:
        if o is not None:
            o._uncounted -= 1


def _where() -> str:
    """Innermost stack frame in this repository (outside this file): 'path:line (function)'."""
    for fr in reversed(traceback.extract_stack()[:-3]):
        f = os.path.abspath(fr.filename)
        if f.startswith(_ROOT) and not f.endswith("opcount.py"):
            return f"{os.path.relpath(f, _ROOT)}:{fr.lineno} ({fr.name})"
    return "?"


_NO_KERNEL = {"aten.empty", "aten.empty_strided", "aten.scalar_tensor", "aten.lift_fresh"}


def _is_view(func) -> bool:
    """Views / metadata-only ops (no kernel launch on a GPU): outputs aliasing an input without writing it."""
    if str(getattr(func, "overloadpacket", "")) in _NO_KERNEL:
        return True
    try:
        rets = func._schema.returns
    except AttributeError:
        return False
    return any(r.alias_info is not None and not r.alias_info.is_write for r in rets)


def _is_bool_tensor(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype in (torch.bool, torch.uint8)


class _Dispatch(TorchDispatchMode):
    def __init__(self, owner: "OpCounter"):
        super().__init__()
        self.o = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        o = self.o
        if o._uncounted:
            return func(*args, **kwargs)
        name = str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)
        o.ops[o.section] = o.ops.get(o.section, 0) + 1
        o.op_names[o.section][name] += 1
        if not _is_view(func):
            o.kernels[o.section] = o.kernels.get(o.section, 0) + 1
        if o._host_depth == 0:
            kind = _SYNC_OPS.get(name)
            if kind is None:
                if name in _INDEX_OPS and len(args) > 1 and isinstance(args[1], (list, tuple)) and \
                        any(_is_bool_tensor(i) for i in args[1]):
                    kind = "bool-index"
                elif name == "aten.repeat_interleave" and kwargs.get("output_size") is None:
                    kind = "repeat_interleave"
                elif name in ("aten._to_copy", "aten.copy_"):
                    src = args[1] if name == "aten.copy_" else args[0]
                    dst_cpu = (args[0].device.type == "cpu") if name == "aten.copy_" else \
                        str(kwargs.get("device", "")) == "cpu"
                    if isinstance(src, torch.Tensor) and src.is_cuda and dst_cpu:
                        kind = "d2h"
            if kind is not None:
                o.syncs.append((o.section, kind, name, _where() if o.where else ""))
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, owner: "OpCounter"):
        super().__init__()
        self.o = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _HOST_FUNCS.get(getattr(func, "__name__", ""))
        if kind is None or self.o._uncounted:
            return func(*args, **kwargs)
        o = self.o
        src = args[0] if args else None
        # .numpy()/.tolist() of a tensor that .cpu() just returned copy nothing more
        if not (func.__name__ != "cpu" and src is not None and any(r() is src for r in o._host_copies)):
            o.syncs.append((o.section, kind, "Tensor." + func.__name__, _where() if o.where else ""))
        o._host_depth += 1
        try:
            res = func(*args, **kwargs)
        finally:
            o._host_depth -= 1
        if func.__name__ == "cpu" and isinstance(res, torch.Tensor):
            o._host_copies = [r for r in o._host_copies if r() is not None][-15:] + [weakref.ref(res)]
        return res


class OpCounter:
    """Context manager: per-section aten op counts (``ops``, ``op_names``) and host syncs (``syncs``)."""

    def __init__(self, section: str = "main", where: bool = True, cuda_paths: bool = True):
        self.section = section
        self.cuda_paths = cuda_paths
        self._host_copies: list = []
        self.where = where
        self.ops: Dict[str, int] = {}
        self.kernels: Dict[str, int] = {}  # ops that are not views/metadata/empty (~ kernel launches on a GPU)
        self.op_names: Dict[str, Counter] = _DefaultCounters()
        self.syncs: List[Tuple[str, str, str, str]] = []
        self._host_depth = 0
        self._uncounted = 0     # > 0 inside kernel_launch
        self._modes = []
        self._prev = None

    def __enter__(self) -> "OpCounter":
        global _ACTIVE
        self._prev, _ACTIVE = _ACTIVE, self
        self._modes = [_Function(self), _Dispatch(self)]
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        global _ACTIVE
        for m in reversed(self._modes):
            m.__exit__(*exc)
        _ACTIVE = self._prev

    # ---------------------------------------------------------------------------------------------- summaries
    def sync_counts(self, prefix: str = "") -> Dict[str, int]:
        """{section: syncs} for sections starting with ``prefix``."""
        out: Dict[str, int] = {}
        for s, *_ in self.syncs:
            if s.startswith(prefix):
                out[s] = out.get(s, 0) + 1
        return out

    def n_syncs(self, prefix: str = "") -> int:
        return sum(self.sync_counts(prefix).values())

    def n_ops(self, prefix: str = "") -> int:
        return sum(v for k, v in self.ops.items() if k.startswith(prefix))

    def n_kernels(self, prefix: str = "") -> int:
        return sum(v for k, v in self.kernels.items() if k.startswith(prefix))

    def sync_sites(self, prefix: str = "") -> Dict[str, int]:
        """{'section kind op @ site': count} (the inventory)."""
        c = Counter(f"{s}: {k} {n} @ {w}" for s, k, n, w in self.syncs if s.startswith(prefix))
        return dict(sorted(c.items()))

    def report(self) -> dict:
        return {"ops": dict(self.ops), "kernels": dict(self.kernels), "syncs": self.sync_counts(), "sync_sites": self.sync_sites(),
                "ops_total": self.n_ops(), "syncs_total": self.n_syncs()}


class _DefaultCounters(dict):
    def __missing__(self, key):
        v = self[key] = Counter()
        return v
