"""YAML configuration loading with validation (``yaml.safe_load`` only; clear errors naming the key and file)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Union

import yaml


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the file, the key path and what is expected."""


def load_yaml(path: Union[str, Path]) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    data.setdefault("_source", str(path))
    return data


def apply_overrides(data: Dict[str, Any], sets, source: str = "--set") -> Dict[str, Any]:
    """``data`` (a parsed config mapping, changed in place and returned) with each ``KEY.PATH=VALUE`` of ``sets``
    applied: the dotted path names nested mappings (created where missing), VALUE is read as one YAML scalar or flow
    value (``true``, ``0.5``, ``[0.8, 1.2]``). The result is validated by whoever builds the config from it, so an
    unknown key or a wrong type is reported there with its path."""
    for item in sets or ():
        key, eq, raw = str(item).partition("=")
        parts = key.strip().split(".")
        if not eq or not all(p.strip() for p in parts):
            raise ConfigError(f"{source} {item!r}: expected KEY.PATH=VALUE, e.g. data.augment.photometric=true")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"{source} {item!r}: VALUE is not valid YAML: {e}") from None
        node = data
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"{source} {item!r}: '{'.'.join(parts[:i + 1])}' is a "
                                  f"{type(nxt).__name__}, not a mapping")
            node = nxt
        node[parts[-1].strip()] = value
    return data


# While a list is installed here (``recording``), every typed read of a Section appends what it accepts: the config
# schema as the validating code states it (``cmfiou_core.tools.config_doc`` turns it into docs/config_parameters.md).
_RECORD: Optional[list] = None


class recording:
    """``with recording() as entries:`` -> dicts (path, key, type, default, constraints) of every key read."""

    def __enter__(self) -> list:
        global _RECORD
        self._prev, _RECORD = _RECORD, []
        return _RECORD

    def __exit__(self, *exc) -> None:
        global _RECORD
        _RECORD = self._prev


class Section:
    """Typed access to one mapping of a config with key-path aware errors.

    >>> s = Section({"a": 1}, "model.rpn", "cfg.yaml"); s.int("a", min=0)
    1
    Unknown keys are reported by :meth:`finish` so typos never pass silently.
    """

    def __init__(self, data: Optional[Mapping[str, Any]], path: str, source: str = "<config>"):
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: '{path}' must be a mapping, got {type(data).__name__}")
        self.data, self.path, self.source, self._used = dict(data), path, source, set()

    def _err(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.source}: '{self.path}.{key}' {msg}" if self.path else f"{self.source}: '{key}' {msg}")

    def _note(self, key, kind, default, required=False, **constraints) -> None:
        if _RECORD is not None:
            _RECORD.append({"path": self.path, "key": key, "type": kind, "default": default,
                            "required": bool(required and default is None),
                            **{k: v for k, v in constraints.items() if v is not None}})

    def _get(self, key, default, required):
        self._used.add(key)
        if key not in self.data:
            if required:
                raise self._err(key, "is required")
            return default
        return self.data[key]

    def sub(self, key: str, required: bool = False) -> "Section":
        self._note(key, "section", None, required)
        v = self._get(key, {}, required)
        return Section(v, f"{self.path}.{key}" if self.path else key, self.source)

    def has(self, key: str) -> bool:
        return key in self.data

    def float(self, key, default=None, *, min=None, max=None, required=False) -> float:
        self._note(key, "number", default, required, min=min, max=max)
        v = self._get(key, default, required and default is None)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self._err(key, f"must be a number, got {v!r}")
        v = float(v)
        if (min is not None and v < min) or (max is not None and v > max):
            raise self._err(key, f"must be in [{min}, {max}], got {v}")
        return v

    def int(self, key, default=None, *, min=None, max=None, required=False) -> int:
        self._note(key, "integer", default, required, min=min, max=max)
        v = self._get(key, default, required and default is None)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self._err(key, f"must be an integer, got {v!r}")
        if (min is not None and v < min) or (max is not None and v > max):
            raise self._err(key, f"must be in [{min}, {max}], got {v}")
        return v

    def bool(self, key, default=None, required=False) -> bool:
        self._note(key, "bool", default, required)
        v = self._get(key, default, required and default is None)
        if not isinstance(v, bool):
            raise self._err(key, f"must be true or false, got {v!r}")
        return v

    def str(self, key, default=None, *, choices: Optional[Iterable[str]] = None, required=False) -> str:
        self._note(key, "string", default, required, choices=None if choices is None else list(choices))
        v = self._get(key, default, required and default is None)
        if not isinstance(v, str):
            raise self._err(key, f"must be a string, got {v!r}")
        if choices is not None and v not in tuple(choices):
            raise self._err(key, f"must be one of {sorted(choices)}, got {v!r}")
        return v

    def floats(self, key, default=None, *, length=None, required=False) -> list:
        self._note(key, "list of numbers", default, required, length=length)
        v = self._get(key, default, required and default is None)
        if not isinstance(v, Sequence) or isinstance(v, str) or \
                not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            raise self._err(key, f"must be a list of numbers, got {v!r}")
        if length is not None and len(v) != length:
            raise self._err(key, f"must have {length} entries, got {len(v)}")
        return [float(x) for x in v]

    def ints(self, key, default=None, *, length=None, required=False) -> list:
        self._note(key, "list of integers", default, required, length=length)
        v = self._get(key, default, required and default is None)
        if not isinstance(v, Sequence) or isinstance(v, str) or \
                not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            raise self._err(key, f"must be a list of integers, got {v!r}")
        if length is not None and len(v) != length:
            raise self._err(key, f"must have {length} entries, got {len(v)}")
        return [int(x) for x in v]

    def raw(self, key, default=None, required=False):
        """The value as written (the caller validates it)."""
        self._note(key, "value", default, required)
        return self._get(key, default, required)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self._used - {"_source"})
        if unknown:
            raise ConfigError(f"{self.source}: unknown key(s) under '{self.path or '<top>'}': {', '.join(unknown)}")
