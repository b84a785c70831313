"""Where the package's installed resources are: ``config/``, ``models/`` (the demo checkpoint), ``msg/``, ``launch/``
and ``compat/`` (the vision_msgs .msg files), found through the *installed* package, never beside a source file.

They live in the share directory of the ROS package ``cmfiou_ros``, looked up in this order:

1. ``$CMFIOU_SHARE_DIR`` (an explicit share directory; for unusual layouts);
2. the ament index: the first prefix on ``$AMENT_PREFIX_PATH`` whose
   ``share/ament_index/resource_index/packages/cmfiou_ros`` exists gives ``<prefix>/share/cmfiou_ros`` (a colcon
   install, a ROS installation, and the pip world's venv, where ``scripts/setup.sh`` registers the interfaces and
   links these folders to the checkout, the way an editable install does);
3. the data files of the installed ``cmfiou`` distribution (``pip install .``: setup.py's ``data_files`` put them in
   ``<prefix>/share/cmfiou_ros``).

Each candidate is checked for the file asked for; a missing resource raises :class:`ResourceNotFound` naming every
place looked in. Pure Python (no rclpy, no ament_index_python): ``cmfiou_core`` stays free of ROS.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Tuple

PACKAGE = "cmfiou_ros"  # the ROS package whose share directory holds the resources
DISTRIBUTION = "cmfiou"  # the pip distribution (setup.py)
KINDS = ("config", "models", "msg", "launch", "compat")


class ResourceNotFound(FileNotFoundError):
    """A resource of the installed package is missing; the message lists where it was looked for."""


def ament_share(package: str) -> Optional[Path]:
    """``<prefix>/share/<package>`` of the first prefix on ``$AMENT_PREFIX_PATH`` that registers ``package`` in its
    ament index (what ``ament_index_python.get_package_share_directory`` returns), else None."""
    for prefix in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        if prefix and (Path(prefix) / "share" / "ament_index" / "resource_index" / "packages" / package).is_file():
            return Path(prefix) / "share" / package
    return None


def _distribution_share() -> Optional[Path]:
    """``share/cmfiou_ros`` of the installed ``cmfiou`` distribution's data files (non-editable pip install)."""
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        dist = distribution(DISTRIBUTION)
    except (ImportError, PackageNotFoundError):
        return None
    marker = ("share", PACKAGE, "package.xml")
    for f in dist.files or ():
        if tuple(f.parts[-3:]) == marker:
            return Path(dist.locate_file(f)).resolve().parent
    return None


def share_dirs() -> List[Tuple[str, Path]]:
    """Candidate share directories in lookup order, as (how it was found, path)."""
    out: List[Tuple[str, Path]] = []
    env = os.environ.get("CMFIOU_SHARE_DIR")
    if env:
        out.append(("$CMFIOU_SHARE_DIR", Path(env)))
    a = ament_share(PACKAGE)
    if a is not None:
        out.append(("ament index ($AMENT_PREFIX_PATH)", a))
    d = _distribution_share()
    if d is not None and all(d != p for _, p in out):
        out.append((f"data files of the installed '{DISTRIBUTION}' distribution", d))
    return out


def _where(cands: List[Tuple[str, Path]]) -> str:
    if not cands:
        return ("no share directory of the package found: $CMFIOU_SHARE_DIR is unset, no prefix on "
                f"$AMENT_PREFIX_PATH ({os.environ.get('AMENT_PREFIX_PATH', '') or 'empty'}) registers {PACKAGE}, "
                f"and no installed '{DISTRIBUTION}' distribution carries share/{PACKAGE}")
    return "looked in: " + "; ".join(f"{p} ({how})" for how, p in cands)


_HINT = ("install the package (colcon build; or scripts/setup.sh in the pip world, then source .venv/cmfiou.env), "
         "or set CMFIOU_SHARE_DIR")


def find(kind: str, name: str = "") -> Path:
    """Path of ``<share>/<kind>/<name>`` (a file or folder; with ``name`` empty, the folder ``<kind>`` itself)."""
    if kind not in KINDS:
        raise ValueError(f"unknown resource kind {kind!r}; known: {', '.join(KINDS)}")
    rel = Path(kind) / name if name else Path(kind)
    cands = share_dirs()
    for _, d in cands:
        p = d / rel
        if p.is_file() or p.is_dir():
            return p
    raise ResourceNotFound(f"resource {rel} of package {PACKAGE} not found ({_where(cands)}); {_HINT}")


def exists(kind: str, name: str = "") -> bool:
    try:
        find(kind, name)
        return True
    except ResourceNotFound:
        return False


def config(name: str) -> Path:
    """``config/<name>`` (model configs, node parameter files, the Fast DDS profile)."""
    return find("config", name)


def model(name: str) -> Path:
    """``models/<name>`` (the bundled demo checkpoint)."""
    return find("models", name)


def msg_dir(package: str) -> Path:
    """The folder of ``package``'s .msg files: ``cmfiou_ros`` -> our ``msg/``; ``vision_msgs`` -> the installed
    vision_msgs' share ``msg/`` (ament index), else our ``compat/vision_msgs/msg`` (a field-identical subset)."""
    if package == PACKAGE:
        return find("msg")
    s = ament_share(package)
    if s is not None and (s / "msg").is_dir():
        return s / "msg"
    try:
        return find("compat", f"{package}/msg")
    except ResourceNotFound as e:
        raise ResourceNotFound(f"{e}; no installed {package} on $AMENT_PREFIX_PATH either") from None
