"""The middleware's message-size limit, read from the active Fast DDS profile, and a writer for such profiles.

Large messages between processes go through Fast DDS's shared-memory (SHM) transport, configured by the XML profile
that ``FASTDDS_DEFAULT_PROFILES_FILE`` names (``config/fastdds_shm.xml``: ``segment_size`` 32 MiB,
``maxMessageSize`` 16 MiB; ``.venv/cmfiou.env`` and ``run_graph`` set it). A message above ``maxMessageSize`` is
sent in fragments: a reliable subscription reassembles it (retransmitting lost fragments), a best-effort one -- the
detector's sensor-data inputs -- loses it whenever a fragment is lost, and the subscriber is never told
(docs/results/message_size_cpu.json). So ``maxMessageSize`` is the size up to which a camera or LiDAR message is
delivered; the nodes warn, on the publishing and on the receiving side, about messages above it.

For bigger sensors write a profile with larger values and point ``FASTDDS_DEFAULT_PROFILES_FILE`` at it::

    python -m cmfiou_ros.transport --max-message-mb 128 --segment-mb 256 --out ~/fastdds_big.xml
    export FASTDDS_DEFAULT_PROFILES_FILE=~/fastdds_big.xml
"""
from __future__ import annotations

import argparse
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from cmfiou_core.cli import report_errors

MIB = 1 << 20
FALLBACK_MB = 16.0  # when no limit can be read (no profile, another RMW): the limit of our shipped profile
_NS = "{http://www.eprosima.com}"


@dataclass
class TransportLimit:
    """``max_message_bytes``: the SHM transport's maxMessageSize (None: unknown); ``source`` says where from."""

    max_message_bytes: Optional[int]
    segment_bytes: Optional[int]
    source: str

    def warn_bytes(self, override_mb: float = 0.0) -> int:
        """The size above which a message is warned about: ``override_mb`` (> 0) or the profile's limit."""
        if override_mb > 0:
            return int(override_mb * MIB)
        return self.max_message_bytes if self.max_message_bytes else int(FALLBACK_MB * MIB)

    def describe(self, override_mb: float = 0.0) -> str:
        if override_mb > 0:
            return f"message_size_warn_mb {override_mb:g}"
        if self.max_message_bytes:
            return f"maxMessageSize {self.max_message_bytes / MIB:g} MiB of {self.source}"
        return f"{FALLBACK_MB:g} MiB (no limit known: {self.source})"


def _int(el, tag: str) -> Optional[int]:
    x = el.find(_NS + tag)
    if x is None:
        x = el.find(tag)
    if x is None or not (x.text or "").strip():
        return None
    v = int(x.text.strip())
    if v <= 0:
        raise ValueError(f"<{tag}> must be positive, got {v}")
    return v


def _findall(el, path: str):
    return el.findall(".//" + _NS + path) or el.findall(".//" + path)


def read_profile(path: str) -> TransportLimit:
    """The SHM limits of a Fast DDS XML profile (its default participant's user transports, else any SHM one)."""
    p = Path(path)
    try:
        root = ET.parse(p).getroot()
    except (OSError, ET.ParseError) as e:
        return TransportLimit(None, None, f"unreadable Fast DDS profile {p}: {e}")
    shm = {}
    for d in _findall(root, "transport_descriptor"):
        tid, typ = d.find(_NS + "transport_id"), d.find(_NS + "type")
        tid = tid if tid is not None else d.find("transport_id")
        typ = typ if typ is not None else d.find("type")
        if typ is not None and (typ.text or "").strip().upper() == "SHM" and tid is not None:
            try:
                shm[(tid.text or "").strip()] = (_int(d, "maxMessageSize"), _int(d, "segment_size"))
            except ValueError as e:
                return TransportLimit(None, None, f"Fast DDS profile {p}: {e}")
    used = None
    for part in _findall(root, "participant"):
        if part.get("is_default_profile", "").lower() == "true":
            used = [(t.text or "").strip() for t in _findall(part, "transport_id")]
            break
    ids = [t for t in (used if used is not None else list(shm)) if t in shm]
    if not ids:
        return TransportLimit(None, None, f"Fast DDS profile {p} has no shared-memory transport in use")
    max_msg, seg = shm[ids[0]]
    if max_msg is None and seg is not None:
        max_msg = seg
    return TransportLimit(max_msg, seg, str(p))


def active_limit(env: Optional[Mapping[str, str]] = None) -> TransportLimit:
    """The limit of the profile this process uses (FASTDDS_DEFAULT_PROFILES_FILE; Fast DDS RMW only)."""
    env = os.environ if env is None else env
    rmw = env.get("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    if not rmw.startswith("rmw_fastrtps"):
        return TransportLimit(None, None, f"RMW {rmw} (not Fast DDS)")
    path = env.get("FASTDDS_DEFAULT_PROFILES_FILE", "")
    if not path:
        return TransportLimit(None, None, "no FASTDDS_DEFAULT_PROFILES_FILE: Fast DDS defaults, multi-MB messages "
                                          "are lost between processes (use config/fastdds_shm.xml)")
    return read_profile(path)


def write_profile(max_message_mb: float, segment_mb: float, out: Path) -> Path:
    """Our shipped profile (config/fastdds_shm.xml) with other SHM sizes."""
    from cmfiou_core import resources

    if max_message_mb <= 0 or segment_mb < max_message_mb:
        raise ValueError(f"need 0 < max_message_mb <= segment_mb (got {max_message_mb:g}, {segment_mb:g})")
    text = resources.config("fastdds_shm.xml").read_text()
    text = re.sub(r"<segment_size>\d+</segment_size>", f"<segment_size>{int(segment_mb * MIB)}</segment_size>", text)
    text = re.sub(r"<maxMessageSize>\d+</maxMessageSize>", f"<maxMessageSize>{int(max_message_mb * MIB)}"
                  "</maxMessageSize>", text)
    out = Path(out)
    out.write_text(text)
    got = read_profile(str(out))
    assert got.max_message_bytes == int(max_message_mb * MIB) and got.segment_bytes == int(segment_mb * MIB), got
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Write a Fast DDS profile for larger messages (or print the active "
                                             "limit with no arguments).")
    ap.add_argument("--max-message-mb", type=float, help="SHM maxMessageSize in MiB (largest sensor message)")
    ap.add_argument("--segment-mb", type=float, help="SHM segment_size in MiB (>= max-message; 2x recommended)")
    ap.add_argument("--out", type=Path, help="where to write the profile")
    ns = ap.parse_args(argv)
    if ns.max_message_mb is None and ns.segment_mb is None:
        lim = active_limit()
        print(f"message size limit: {lim.describe()}")
        return 0
    if ns.max_message_mb is None or ns.out is None:
        ap.error("--max-message-mb and --out are needed (--segment-mb defaults to 2 x --max-message-mb)")

    def write() -> str:
        out = write_profile(ns.max_message_mb, ns.segment_mb or 2 * ns.max_message_mb, ns.out)
        return f"wrote {out}: export FASTDDS_DEFAULT_PROFILES_FILE={out.resolve()}"
    return report_errors(write, (ValueError, OSError), "error", 2)


if __name__ == "__main__":
    raise SystemExit(main())
