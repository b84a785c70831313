"""Process memory helpers: resident set size and glibc heap statistics, and ``malloc_trim``.

Why: CPU inference allocates and frees hundreds of MB of tensors per frame. glibc keeps freed chunks in its arenas
(the worker thread's arena grows in 64 MB heaps that only shrink from the top, and large blocks stop being mmapped
once the dynamic mmap threshold has risen), so the resident set climbs towards the high-water mark of the frames seen
so far and stays there although the memory in use is flat (a plateau, not a leak). ``malloc_trim(0)`` returns the free
pages of every arena to the kernel (madvise): between frames the RSS drops to what is really in use, but the next
frame faults the pages back in (the peak RSS drops much less than the resting RSS; the CPU cost measured ~12% of a
CPU frame when trimming after every frame).
Measured in bench/soak_inprocess.py (docs/results/archive/soak_inprocess_cpu.json, earlier checkpoint).

Every function is a harmless no-op (False / empty) where glibc is not the C library.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path
from typing import Dict, Optional


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]


def _load_libc() -> Optional[ctypes.CDLL]:
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(lib, "malloc_trim"):
        return None
    lib.malloc_trim.argtypes = [ctypes.c_size_t]
    lib.malloc_trim.restype = ctypes.c_int
    if hasattr(lib, "mallinfo2"):
        lib.mallinfo2.restype = _Mallinfo2
    return lib


_LIBC = _load_libc()


def malloc_trim(pad: int = 0) -> bool:
    """Give the free memory of every glibc arena back to the kernel; True when glibc released something."""
    return bool(_LIBC.malloc_trim(pad)) if _LIBC is not None else False


def heap_mb() -> Dict[str, float]:
    """glibc heap over all arenas (MB): ``in_use`` (allocated, mmapped chunks included), ``free_held`` (freed but
    kept by malloc; after malloc_trim its pages are no longer resident though still counted here)."""
    if _LIBC is None or not hasattr(_LIBC, "mallinfo2"):
        return {}
    m = _LIBC.mallinfo2()
    return {"in_use": (m.uordblks + m.hblkhd) / 2 ** 20, "free_held": m.fordblks / 2 ** 20}


def rss_mb(pid: str = "self", field: str = "VmRSS") -> float:
    """A /proc/<pid>/status field in MB (VmRSS, RssAnon, VmHWM, ...); NaN where unavailable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")
