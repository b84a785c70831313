"""Provenance of a results file: which code, configuration, weights, device and command produced it.

``provenance(config, checkpoint, device, argv)`` -> a JSON-ready dict that every results JSON written by ``bench/``,
``cmfiou_core.tools.evaluate``, ``cmfiou-eval-kitti`` and ``cmfiou-bag-eval`` carries under the key ``provenance``:

- ``git_commit`` / ``git_dirty``: ``HEAD`` of the repository holding this package and whether tracked files differ
  from it (None when the package does not sit in a git checkout, e.g. an installed copy; ``git_error`` says why);
- ``config`` / ``config_sha256``: the model YAML (``None`` = the default ``config/cmfiou_kitti.yaml``) and the
  SHA-256 of its bytes;
- ``checkpoint`` / ``checkpoint_sha256``: the weights file ('' / None = the bundled demo checkpoint, resolved here to
  its path; "none" = random weights, no hash);
- ``device`` / ``device_name``: the torch device string and the GPU's name, or the CPU model for the CPU;
- ``command``: the command line (``sys.orig_argv``, the interpreter's own, unless ``argv`` is given), ``cwd``; ``python``, ``torch``, ``host``,
  ``time_utc``.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

REPO_ROOT = Path(__file__).resolve().parents[1]
_HASH_CACHE: Dict[tuple, str] = {}


def file_sha256(path: Union[str, Path]) -> str:
    """SHA-256 (hex) of a file's bytes; cached per (path, size, mtime)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def git_state(root: Union[str, Path] = REPO_ROOT) -> Dict[str, object]:
    """{'git_commit': sha or None, 'git_dirty': bool or None[, 'git_error': why]} of the checkout at ``root``; a
    ``root`` that is not the top of its checkout (the code installed inside some other repository) records none."""
    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"git_commit": None, "git_dirty": None, "git_error": head.stderr.strip() or "not a git checkout"}
        top = git("rev-parse", "--show-toplevel").stdout.strip()
        if not top or Path(top).resolve() != Path(root).resolve():
            return {"git_commit": None, "git_dirty": None,
                    "git_error": f"{root} is not the top of a git checkout (it lies inside {top or 'none'})"}
        status = git("status", "--porcelain", "--untracked-files=no")
        return {"git_commit": head.stdout.strip(), "git_dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError) as e:
        return {"git_commit": None, "git_dirty": None, "git_error": f"{type(e).__name__}: {e}"}


def device_name(device: Union[str, "object", None]) -> Optional[str]:
    """The GPU's name for a CUDA device, the CPU model for the CPU."""
    dev = str(device) if device is not None else "cpu"
    if dev.startswith("cuda"):
        try:
            import torch

            return torch.cuda.get_device_name(torch.device(dev))
        except Exception as e:  # noqa: BLE001 - provenance never fails a run
            return f"unknown CUDA device ({type(e).__name__}: {e})"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _resolve_checkpoint(checkpoint) -> Optional[str]:
    if checkpoint is None or checkpoint == "":
        try:
            from .pipeline import demo_checkpoint

            return str(demo_checkpoint())
        except Exception as e:  # noqa: BLE001 - provenance never fails a run (a missing resource names itself)
            return f"bundled demo checkpoint ({type(e).__name__}: {e})"
    if str(checkpoint).lower() == "none":
        return None
    return str(checkpoint)


def provenance(config=None, checkpoint=None, device=None, argv: Optional[Sequence[str]] = None,
               resolve_default_checkpoint: bool = True) -> Dict[str, object]:
    """The provenance record (module doc). ``resolve_default_checkpoint``: '' / None mean the bundled demo
    checkpoint and the default config (as in ``Pipeline.from_config``); pass False where no model runs at all
    (ground-truth predictions, a result folder): '' / None are then recorded as None."""
    out: Dict[str, object] = dict(git_state())
    if (config is None or config == "") and resolve_default_checkpoint:
        try:
            from .pipeline import default_config

            config = default_config()
        except Exception as e:  # noqa: BLE001
            out["config_error"] = f"{type(e).__name__}: {e}"
    out["config"] = None if config in (None, "") else str(config)
    out["config_sha256"] = None
    if out["config"] is not None:
        try:
            out["config_sha256"] = file_sha256(config)
        except OSError as e:
            out["config_error"] = f"{type(e).__name__}: {e}"
    ck = _resolve_checkpoint(checkpoint) if resolve_default_checkpoint else (
        None if checkpoint in (None, "") else str(checkpoint))
    out["checkpoint"] = ck
    out["checkpoint_sha256"] = None
    if ck is not None:
        try:
            out["checkpoint_sha256"] = file_sha256(ck)
        except OSError as e:
            out["checkpoint_error"] = f"{type(e).__name__}: {e}"
    out["device"] = None if device is None else str(device)
    out["device_name"] = device_name(device)
    args = list(getattr(sys, "orig_argv", sys.argv) if argv is None else argv)
    out["command"] = shlex.join(args)
    out["cwd"] = os.getcwd()
    out["python"] = platform.python_version()
    try:
        import torch

        out["torch"] = torch.__version__
    except ImportError:
        out["torch"] = None
    out["host"] = platform.node()
    out["time_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return out


def write_report(path, report: Dict[str, object], config=None, checkpoint=None, device=None) -> None:
    """Attach the provenance record to ``report`` and write it as JSON to ``path`` (parents created; no-op for a
    falsy path). A provenance failure is recorded in the report, never raised: a measurement is not lost for it."""
    try:
        report["provenance"] = provenance(config=config, checkpoint=checkpoint, device=device)
    except Exception as e:  # noqa: BLE001
        report["provenance_error"] = f"{type(e).__name__}: {e}"
    if path:
        import json

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=1))
