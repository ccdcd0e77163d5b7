"""The target registry: built-in targets ship as YAML in ``edgeopt/data/targets``.

A target is named either by a built-in name (``jetson-orin``) or by a path to a
YAML file.  A user file may start from a built-in one with ``base: NAME`` and
override only what differs; mappings are merged key by key, lists replaced::

    base: mcu-cortex-m7
    name: my-m7-256k
    budgets: {ram: 256KiB}
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import EdgeoptError, TargetFileError, UnknownTargetError
from .types import Target

BUILTIN_DIR = Path(__file__).resolve().parent / "data" / "targets"
#: The machine edgeopt runs on, with a compute model measured by a cached micro-benchmark
#: (:mod:`edgeopt.microbench`).  Not among :func:`builtin_names`, so ``--targets all`` runs no benchmark.
HOST = "host"


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def valid_names() -> list[str]:
    """Every name :func:`load_target` accepts: the built-in targets and ``host``."""
    return sorted([*builtin_names(), HOST])


#: The largest target file read (a target is a few KiB of YAML; anything bigger is a mistake or hostile).
MAX_TARGET_FILE_BYTES = 1 << 20
#: How deep mappings/lists may nest in a target file, and how many values it may hold in all (YAML aliases can make a
#: small file expand to billions of values when walked).
MAX_DEPTH = 16
MAX_NODES = 100_000


class UnknownBaseError(UnknownTargetError, TargetFileError):
    """A target file whose ``base`` names no built-in target."""

    def __init__(self, base: object, source: str, valid: list[str]):
        EdgeoptError.__init__(self, f"target file {source}: base: unknown target {_show(base)}; valid: "
                                    f"{', '.join(valid)}")


def _show(v: object, limit: int = 40) -> str:
    """A short, one-line rendering of a value from a target file for an error message."""
    r = repr(v) if isinstance(v, str) else str(v) if isinstance(v, (int, float, bool, type(None))) else type(v).__name__
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _check_tree(data: Any, source: str) -> None:
    """Refuse non-string keys, nesting deeper than :data:`MAX_DEPTH` and more than :data:`MAX_NODES` values
    (walked iteratively: a YAML alias bomb is stopped after MAX_NODES values, not expanded)."""
    stack: list[tuple[Any, tuple[str, ...]]] = [(data, ())]
    nodes = 0
    while stack:
        v, where = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise TargetFileError(f"target file {source} holds more than {MAX_NODES:,} values (YAML aliases?); "
                                  "a target is a small mapping")
        if len(where) > MAX_DEPTH:
            raise TargetFileError(f"target file {source}: {'.'.join(where[:4])}...: nested more than {MAX_DEPTH} "
                                  "levels deep")
        if isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str):
                    loc = ".".join(where) or "(top level)"
                    raise TargetFileError(f"target file {source}: {loc}: key {_show(k)} is not a string; keys are "
                                          "field names")
                stack.append((x, (*where, k)))
        elif isinstance(v, list):
            stack.extend((x, (*where, str(i))) for i, x in enumerate(v))


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block the open
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise TargetFileError(f"target file {path} is not a regular file")
            raw = f.read(MAX_TARGET_FILE_BYTES + 1)
    except OSError as e:
        raise TargetFileError(f"cannot read target file {path}: {e.strerror or e}") from e
    if len(raw) > MAX_TARGET_FILE_BYTES:
        raise TargetFileError(f"target file {path} is larger than {MAX_TARGET_FILE_BYTES >> 20} MiB; a target is a "
                              "small YAML mapping")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise TargetFileError(f"target file {path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                              "a target file is YAML or JSON") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise TargetFileError(f"target file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise TargetFileError(f"target file {path} is not a valid target: nested too deeply") from None
    if data is None:
        raise TargetFileError(f"target file {path} is empty; it must hold a mapping (name, description, budgets, ...)")
    if not isinstance(data, dict):
        raise TargetFileError(f"target file {path} must hold a mapping (name, description, budgets, ...), "
                              f"not a {type(data).__name__}")
    _check_tree(data, str(path))
    return data


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _validate(data: dict[str, Any], source: str) -> Target:
    from pydantic import ValidationError

    try:
        return Target.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        msg = first["msg"].replace("Value error, ", "")  # our validators' messages say what they got
        got = first.get("input")
        if first["type"] not in ("value_error", "extra_forbidden") and isinstance(got, (str, int, float, bool)):
            msg += f" (got {_show(got)})"
        more = f" (+{e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise TargetFileError(f"invalid target {source}: {where}: {msg}{more}") from None


def _resolve(data: dict[str, Any], source: str, seen: tuple[str, ...]) -> dict[str, Any]:
    if "extends" in data and "base" not in data:
        raise TargetFileError(f"target file {source}: extends: unknown field; to start from a built-in target write "
                              f"'base: NAME' (valid: {', '.join(builtin_names())})")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise TargetFileError(f"target file {source}: base: must be the name of a built-in target, not "
                              f"{_show(base)}; valid: {', '.join(builtin_names())}")
    if base in seen:
        raise TargetFileError(f"target {source}: 'base' chain loops through {base!r}")
    if base not in builtin_names():
        raise UnknownBaseError(base, source, builtin_names())
    parent = _resolve(_read_yaml(BUILTIN_DIR / f"{base}.yaml"), base, (*seen, base))
    return _merge(parent, data)


@lru_cache(maxsize=64)
def _load_builtin(name: str) -> Target:
    data = _resolve(_read_yaml(BUILTIN_DIR / f"{name}.yaml"), name, (name,))
    return _validate(data, name)


def load_target(name_or_path: str | Path) -> Target:
    """A built-in target by name, ``host`` (this machine, measured), or a target file by path (``.yaml``/``.yml``/``.json``).

    Raises:
        UnknownTargetError: a name that is neither built in nor a path.
        TargetFileError: a file that is missing, not a regular file, over 1 MiB, not UTF-8, not YAML, or whose
            content is not a valid target (the message names the file, the field and what is valid).
    """
    s = str(name_or_path)
    if s in builtin_names():
        return _load_builtin(s)
    if s == HOST:
        from .microbench import host_target

        return host_target()
    if not s.strip():
        raise UnknownTargetError(s, valid_names())
    path = Path(s)
    try:
        exists = path.exists()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        exists = False
    looks_like_path = path.suffix in {".yaml", ".yml", ".json"} or "/" in s or exists
    if not looks_like_path:
        raise UnknownTargetError(s, valid_names())
    if not exists:
        raise TargetFileError(f"target file {path} does not exist; built-in targets: {', '.join(valid_names())}")
    data = _read_yaml(path)
    return _validate(_resolve(data, str(path), ()), str(path))


def load_targets(spec: str) -> list[Target]:
    """``all`` or a comma-separated list of names/paths."""
    names = builtin_names() if spec.strip() == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise UnknownTargetError(spec, valid_names())
    return [load_target(n) for n in names]


def target_sha256(target: Target) -> str:
    blob = json.dumps(target.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()
