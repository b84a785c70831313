"""``load_factory('module:Attr.attr')``: the pipeline factory named by a node parameter or a command-line flag."""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any, Callable, Type


def load_factory(path: str, what: str = "pipeline_factory", error: Type[Exception] = ValueError) -> Callable:
    """``'pkg.module:Attr.attr'`` or ``'/path/file.py:Attr.attr'`` -> the callable it names. ``what`` names the
    parameter in errors (``error``, default ValueError): no ``:attr``, a missing file, a non-callable."""
    mod_name, _, attr = str(path).partition(":")
    if not mod_name or not attr:
        raise error(f"{what} {path!r}: expected 'module:attr'")
    if mod_name.endswith(".py"):
        p = Path(mod_name)
        if not p.is_file():
            raise error(f"{what}: file {p} not found")
        spec = importlib.util.spec_from_file_location(f"_cmfiou_factory_{p.stem}", p)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    else:
        mod = importlib.import_module(mod_name)
    obj: Any = mod
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise error(f"{what} {path!r} is not callable")
    return obj
