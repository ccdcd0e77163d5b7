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
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import TargetFileError, UnknownTargetError
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


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise TargetFileError(f"cannot read target file {path}: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise TargetFileError(f"target file {path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise TargetFileError(f"target file {path} must hold a mapping, not {type(data).__name__}")
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
        more = f" (+{e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise TargetFileError(f"invalid target {source}: {where}: {first['msg']}{more}") from e


def _resolve(data: dict[str, Any], source: str, seen: tuple[str, ...]) -> dict[str, Any]:
    base = data.pop("base", None)
    if base is None:
        return data
    if base in seen:
        raise TargetFileError(f"target {source}: 'base' chain loops through {base!r}")
    if base not in builtin_names():
        raise UnknownTargetError(str(base), builtin_names())
    parent = _resolve(_read_yaml(BUILTIN_DIR / f"{base}.yaml"), base, (*seen, base))
    return _merge(parent, data)


@lru_cache(maxsize=64)
def _load_builtin(name: str) -> Target:
    data = _resolve(_read_yaml(BUILTIN_DIR / f"{name}.yaml"), name, (name,))
    return _validate(data, name)


def load_target(name_or_path: str | Path) -> Target:
    """A built-in target by name, ``host`` (this machine, measured), or a target file by path (``.yaml``/``.yml``/``.json``)."""
    s = str(name_or_path)
    if s in builtin_names():
        return _load_builtin(s)
    if s == HOST:
        from .microbench import host_target

        return host_target()
    path = Path(s)
    looks_like_path = path.suffix in {".yaml", ".yml", ".json"} or "/" in s or path.exists()
    if not looks_like_path:
        raise UnknownTargetError(s, valid_names())
    if not path.is_file():
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
