"""The target registry: built-in targets ship as YAML in ``edgeopt/data/targets``.

A target is named by a built-in device name (``jetson-orin``), an alias of one (``agx-orin``), a family name
(``jetson``: the family's default member), ``host``, or a path to a YAML file.  Each device file names its
``family`` and its ``aliases``; ``_families.yaml`` describes the families and names each one's default member
(what ``--target FAMILY`` and ``--targets all`` pick).  A user file may start from a built-in one with
``base: NAME`` and override only what differs; mappings are merged key by key, lists replaced::

    base: mcu-cortex-m7
    name: my-m7-256k
    budgets: {ram: 256KiB}
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import EdgeoptError, TargetFileError, UnknownTargetError
from .types import Target

BUILTIN_DIR = Path(__file__).resolve().parent / "data" / "targets"
#: The file that declares the families (description and default member of each); device files name their family.
FAMILIES_FILE = BUILTIN_DIR / "_families.yaml"
#: The machine edgeopt runs on, with a compute model measured by a cached micro-benchmark
#: (:mod:`edgeopt.microbench`).  Not among :func:`builtin_names`, so ``--targets all``/``every`` run no benchmark.
HOST = "host"
#: ``--targets`` words: the default member of every family, and every built-in device.
ALL = "all"
EVERY = "every"

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    default: str
    members: tuple[str, ...]
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Catalog:
    """The built-in devices, their families and aliases, read from the YAML files (see the module docstring)."""

    families: dict[str, Family]  # in the order of _families.yaml; members default first
    family_of: dict[str, str]  # device -> family
    device_aliases: dict[str, tuple[str, ...]]  # device -> its aliases
    names: dict[str, str]  # every accepted name (device, alias, family, family alias) -> device

    def resolve(self, name: str) -> str | None:
        """The device ``name`` stands for, or None."""
        return self.names.get(name)

    def family(self, name: str) -> Family | None:
        """The family named ``name`` or one of its aliases, or None."""
        return self.families.get(name) or next((f for f in self.families.values() if name in f.aliases), None)

    def defaults(self) -> list[str]:
        """The default member of each family, sorted."""
        return sorted(f.default for f in self.families.values())


def _catalog_error(msg: str) -> TargetFileError:
    return TargetFileError(f"built-in target catalog ({BUILTIN_DIR}): {msg}")


def _str_list(v: Any, where: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if not isinstance(v, list) or not all(isinstance(x, str) and _NAME.match(x) for x in v):
        raise _catalog_error(f"{where}: must be a list of names (lower case, digits, '.', '_', '-'), not {_show(v)}")
    return tuple(v)


@lru_cache(maxsize=1)
def catalog() -> Catalog:
    """The built-in catalog, checked: every device in a declared family, each family's default one of its members,
    and every name (device, alias, family) standing for one device only (a family may share its name with its default
    member, as x86-cpu does)."""
    global _building
    _building = True  # built-in files name their base by device name: the catalog is not consulted while it is made
    try:
        return _make_catalog()
    finally:
        _building = False


_building = False


def _make_catalog() -> Catalog:
    devices = sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml") if not p.name.startswith("_"))
    raw = _read_yaml(FAMILIES_FILE)
    family_of: dict[str, str] = {}
    device_aliases: dict[str, tuple[str, ...]] = {}
    for d in devices:
        data = _read_yaml(BUILTIN_DIR / f"{d}.yaml")
        device_aliases[d] = _str_list(data.get("aliases"), f"{d}.yaml: aliases")
        fam = _resolve(data, d, (d,)).get("family")  # a file with a base takes its family from there
        if fam not in raw:
            raise _catalog_error(f"{d}.yaml: family {_show(fam)} is not declared in {FAMILIES_FILE.name} "
                                 f"(declared: {', '.join(raw)})")
        family_of[d] = fam
    families: dict[str, Family] = {}
    for name, spec in raw.items():
        if not isinstance(spec, dict) or set(spec) - {"description", "default", "aliases"}:
            raise _catalog_error(f"{FAMILIES_FILE.name}: {name}: a family is a mapping of description, default and "
                                 f"aliases, not {_show(spec)}")
        default = spec.get("default")
        members = tuple(sorted((d for d in devices if family_of[d] == name), key=lambda d: (d != default, d)))
        if default not in members:
            raise _catalog_error(f"{FAMILIES_FILE.name}: {name}: default {_show(spec.get('default'))} is not a member "
                                 f"(members: {', '.join(members) or 'none'})")
        families[name] = Family(name, str(spec.get("description", "")), spec["default"], members,
                                _str_list(spec.get("aliases"), f"{FAMILIES_FILE.name}: {name}: aliases"))
    names: dict[str, str] = {d: d for d in devices}
    claims = [(a, d, f"alias of {d}") for d, al in device_aliases.items() for a in al]
    for f in families.values():
        claims += [(n, f.default, f"family {f.name}") for n in (f.name, *f.aliases)]
    for n, d, what in claims:
        if names.get(n, d) != d or n == HOST:
            raise _catalog_error(f"the name {n!r} ({what}) already stands for {names.get(n, HOST)}")
        names[n] = d
    return Catalog(families, family_of, device_aliases, names)


def builtin_names() -> list[str]:
    """The built-in devices (one YAML file each), sorted."""
    return sorted(catalog().family_of)


def family_names() -> list[str]:
    return sorted(catalog().families)


def default_names() -> list[str]:
    """The default member of each family: what ``--targets all`` builds."""
    return catalog().defaults()


def alias_names() -> dict[str, str]:
    """Each alias (of a device or a family) -> the device it stands for."""
    c = catalog()
    return {n: d for n, d in sorted(c.names.items()) if n not in c.family_of and n not in c.families}


def valid_names() -> list[str]:
    """The names an unknown-target error lists: the built-in devices, the families and ``host`` (aliases resolve too,
    :func:`alias_names`; ``edgeopt targets list`` shows them)."""
    return sorted({*builtin_names(), *family_names(), HOST})


class UnknownTargetNameError(UnknownTargetError):
    """A target name that is no device, alias, family, ``host`` or path; the message lists families and devices."""

    def __init__(self, name: str):
        close = difflib.get_close_matches(name, [*catalog().names, HOST], n=1, cutoff=0.75) if len(name) <= 64 else []
        hint = f"did you mean {close[0]!r}? " if close else ""
        EdgeoptError.__init__(
            self, f"unknown target {_show(name, 80)}; {hint}families: {', '.join(family_names())}; devices: "
                  f"{', '.join(builtin_names())}; or {HOST}, or a path to a .yaml file "
                  "(aliases: edgeopt targets list)")


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

    from .io import read_small_file

    raw = read_small_file(path, MAX_TARGET_FILE_BYTES, TargetFileError, "target file", "a target is a small YAML mapping")
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
    # a device file's own name first (built-in files name their base so, and the catalog reads them), then the catalog
    if not _is_device_file(base) and _building:
        raise _catalog_error(f"{source}.yaml: base: {_show(base)} is not a device file's name")
    device = base if _is_device_file(base) else catalog().resolve(base)
    if device is None:
        raise UnknownBaseError(base, source, sorted({*builtin_names(), *family_names()}))
    parent = _builtin_data(device, seen)
    parent.pop("aliases", None)  # the catalog's names for the base, not for what starts from it
    return _merge(parent, data)


def _is_device_file(name: str) -> bool:
    return bool(_NAME.match(name)) and (BUILTIN_DIR / f"{name}.yaml").is_file()


def _builtin_data(name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A built-in device file with its ``base`` chain merged in (not the base's ``aliases``)."""
    if name in seen:
        raise TargetFileError(f"target {seen[-1]}: 'base' chain loops through {name!r}")
    return _resolve(_read_yaml(BUILTIN_DIR / f"{name}.yaml"), name, (*seen, name))


@lru_cache(maxsize=64)
def _load_builtin(name: str) -> Target:
    return _validate(_builtin_data(name), name)


def load_target(name_or_path: str | Path) -> Target:
    """A built-in target by device name, alias or family name (the family's default member), ``host`` (this machine,
    measured), or a target file by path (``.yaml``/``.yml``/``.json``).  An alias or family name loads the device's
    own definition: its ``name`` is the device's (``load_target("jetson").name == "jetson-orin"``).

    Raises:
        UnknownTargetError: a name that is neither built in nor a path.
        TargetFileError: a file that is missing, not a regular file, over 1 MiB, not UTF-8, not YAML, or whose
            content is not a valid target (the message names the file, the field and what is valid).
    """
    s = str(name_or_path)
    device = catalog().resolve(s)
    if device is not None:
        return _load_builtin(device)
    if s == HOST:
        from .microbench import host_target

        return host_target()
    if not s.strip():
        raise UnknownTargetNameError(s)
    path = Path(s)
    try:
        exists = path.exists()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        exists = False
    looks_like_path = path.suffix in {".yaml", ".yml", ".json"} or "/" in s or exists
    if not looks_like_path:
        raise UnknownTargetNameError(s)
    if not exists:
        raise TargetFileError(f"target file {path} does not exist; built-in targets: {', '.join(valid_names())}")
    data = _read_yaml(path)
    return _validate(_resolve(data, str(path), ()), str(path))


def load_targets(spec: str) -> list[Target]:
    """A comma-separated list of names/paths, where ``all`` stands for the default member of each family
    (:func:`default_names`, one device per family) and ``every`` for every built-in device; a target named twice is
    loaded once."""
    names: list[str] = []
    for s in (s.strip() for s in spec.split(",")):
        names += default_names() if s == ALL else builtin_names() if s == EVERY else [s] if s else []
    if not names:
        raise UnknownTargetNameError(spec)
    out: list[Target] = []
    for n in names:
        t = load_target(n)
        if t not in out:
            out.append(t)
    return out


#: Families a target's ``family`` was hashed for before the catalog (only x86-cpu and arm64-cpu had one): their
#: family stays in the hash, so plans saved then still replay; any other family, like ``sources`` and ``aliases``, is
#: metadata that changes nothing planned or built and is left out.
_HASHED_FAMILIES = frozenset({"x86-cpu", "arm64-cpu"})


def target_sha256(target: Target) -> str:
    """The hash a plan records of its target's definition (checked when the plan is replayed): everything that decides
    planning and building; not ``sources`` and ``aliases``, nor the ``family`` (except x86-cpu/arm64-cpu, see
    _HASHED_FAMILIES)."""
    data = target.model_dump(mode="json", exclude={"sources", "aliases"})
    if data.get("family") not in _HASHED_FAMILIES:
        data["family"] = None
    if not data["budgets"].get("latency_is_limit"):  # the default (a goal) hashes as before the field existed
        data["budgets"].pop("latency_is_limit", None)
    blob = json.dumps(data, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()
