"""Small pieces shared by the benchmark scripts (they run as scripts, so ``bench/`` is on ``sys.path``)."""
from __future__ import annotations

import json
import platform
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch


def pct(v: Sequence[float], q: float) -> float:
    """The q-th percentile of ``v`` (nan for an empty list)."""
    return float(np.percentile(np.asarray(v), q)) if v else float("nan")


def p50_p95_mean(v: Sequence[float]) -> Dict[str, float]:
    return {"p50": pct(v, 50), "p95": pct(v, 95), "mean": float(np.mean(v))}


def device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()


def cuda_sync_messages(fn: Callable[[], object]) -> List[str]:
    """Run ``fn`` once under ``torch.cuda.set_sync_debug_mode('warn')`` and return the first line of every host-sync
    warning it raised (CUDA only)."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [str(x.message).splitlines()[0] for x in w if "synchroniz" in str(x.message).lower()]


def write_json(out: dict, path: Optional[str], provenance: Optional[dict] = None) -> None:
    """``--json PATH``: indented JSON to PATH, or to stdout for '-'; nothing for None. ``provenance``
    (``cmfiou_core.provenance.provenance(...)``) is stored under the key ``provenance``."""
    if not path:
        return
    if provenance is not None:
        out = {**out, "provenance": provenance}
    txt = json.dumps(out, indent=2)
    if path == "-":
        print(txt)
    else:
        Path(path).write_text(txt + "\n")



def pipeline_arg_parser(doc: str):
    """An ArgumentParser with the options every pipeline-comparing bench takes: --config, --checkpoint (empty: the
    bundled demo checkpoint), --device, --kitti DIR (repeatable; KITTI-layout folders)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None)
    ap.add_argument("--checkpoint", default="")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--kitti", action="append", default=[])
    return ap
