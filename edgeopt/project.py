"""The project file: ``edgeopt.yaml`` (or ``[tool.edgeopt]`` in ``pyproject.toml``) in a project folder.

It names what every command would otherwise take as arguments: the model, its input shapes and data, the accuracy
budget, the objective, the default target, the fleet's targets and the output folder, so that inside the folder
``edgeopt build --target jetson`` needs nothing else.  ``edgeopt init`` writes a commented one.

:func:`find_project` locates and :func:`load_project` validates the file (strictly: unknown keys, bad values and
missing paths are refused in one line naming the key); :func:`resolve` merges it with explicit arguments (which win)
into :class:`Settings`, the values a command runs with.  Paths in the file are relative to the file's folder.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from .errors import EdgeoptError

#: The project file's name; ``edgeopt init`` writes it and every command looks for it in the current folder.
PROJECT_FILE = "edgeopt.yaml"
PYPROJECT = "pyproject.toml"
#: The largest project file read (a project file is a few lines; anything bigger is a mistake).
MAX_PROJECT_FILE_BYTES = 1 << 20
#: How deep mappings/lists may nest and how many values the file may hold (YAML aliases can expand a small file).
MAX_DEPTH = 8
MAX_NODES = 10_000
#: The output folder when the file names none: ``build`` writes ``build/<target>``, ``fleet`` ``build/fleet``.
DEFAULT_OUTPUT = "build"
FLEET_FOLDER = "fleet"
#: The name of the embedded digits CNN (it brings its own calibration and labelled evaluation data).
DEFAULT_MODEL = "default"
NO_PROJECT_HINT = (f"no model given and no {PROJECT_FILE} here: run 'edgeopt init' (or pass a model file, or "
                   f"'{DEFAULT_MODEL}' for the embedded digits CNN)")


class ProjectFileError(EdgeoptError):
    """A project file that cannot be read or does not validate (the message names the file and the key)."""


@lru_cache(maxsize=1)
def _file_model():
    """The project file's schema (a pydantic model; built on first use so that importing this module stays light)."""
    from pydantic import BaseModel, ConfigDict, field_validator

    class ProjectFile(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

        model: str = DEFAULT_MODEL
        input_shapes: dict[str, Any] = {}
        calib: str | None = None
        eval: str | None = None
        labels: str | None = None
        inputs: str | None = None
        max_accuracy_drop: float | None = None
        min_snr_db: float | None = None
        max_latency_ms: float | None = None
        preprocess: Literal["imagenet", "unit", "raw", "none"] | None = None
        objective: Literal["latency", "fidelity"] | None = None
        target: str | None = None
        targets: Any = None
        output: str = DEFAULT_OUTPUT

        @field_validator("model", "calib", "eval", "labels", "inputs", "target", "output")
        @classmethod
        def _not_blank(cls, v):
            if v is not None and not v.strip():
                raise ValueError("must not be empty")
            return v

        @field_validator("max_accuracy_drop")
        @classmethod
        def _drop(cls, v):
            if v is not None and not (math.isfinite(v) and 0 <= v <= 1):
                raise ValueError(f"must be a fraction between 0 and 1, e.g. 0.01 for one point of top-1 (got {v})")
            return v

        @field_validator("max_latency_ms")
        @classmethod
        def _latency(cls, v):
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"must be a positive number of milliseconds, e.g. 20 (got {v})")
            return v

        @field_validator("min_snr_db")
        @classmethod
        def _snr(cls, v):
            if v is not None and not math.isfinite(v):
                raise ValueError(f"must be a finite number of dB, e.g. 30 (got {v})")
            return v

        @field_validator("input_shapes")
        @classmethod
        def _shapes(cls, v):
            for name, dims in v.items():
                if isinstance(dims, str):
                    parts = dims.replace(",", "x").split("x")
                    ok = all(p.strip().isdigit() and int(p) > 0 for p in parts)
                elif isinstance(dims, list):
                    ok = bool(dims) and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims)
                else:
                    ok = False
                if not ok:
                    raise ValueError(f"{name}: expected positive dims like 1x3x224x224 or [1, 3, 224, 224], "
                                     f"not {_show(dims)}")
            return v

        @field_validator("targets")
        @classmethod
        def _targets(cls, v):
            if v is None:
                return v
            names = v.split(",") if isinstance(v, str) else v if isinstance(v, list) else None
            if names is None or not names or not all(isinstance(n, str) and n.strip() for n in names):
                raise ValueError(f"expected 'all' or a list of target names, not {_show(v)}")
            return v

    return ProjectFile


def valid_keys() -> list[str]:
    """The keys a project file may hold."""
    return list(_file_model().model_fields)


def _show(v: object, limit: int = 40) -> str:
    r = repr(v) if isinstance(v, str) else str(v) if isinstance(v, (int, float, bool, type(None))) else type(v).__name__
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _looks_like_path(name: str) -> bool:
    """A target named by a file (``targets/m7.yaml``) rather than by a built-in name."""
    return "/" in name or os.sep in name or Path(name).suffix in {".yaml", ".yml", ".json"}


def output_name(target: str) -> str:
    """The folder a build for ``target`` writes under the output folder: the name as typed (``jetson``), or a target
    file's stem (``targets/m7.yaml`` -> ``m7``)."""
    return Path(target).stem if _looks_like_path(target) else target


@dataclass(frozen=True)
class Project:
    """A validated project file; every path absolute (resolved against the file's folder)."""

    path: Path
    sha256: str
    table: str | None  # "tool.edgeopt" when read from pyproject.toml
    model: str  # DEFAULT_MODEL or an absolute path
    input_shapes: tuple[str, ...]  # NAME=DIMS, as --input-shape takes them
    calib: Path | None
    eval_data: Path | None
    labels: Path | None
    inputs: Path | None
    max_accuracy_drop: float | None
    min_snr_db: float | None
    objective: str | None
    target: str | None
    targets: str | None  # 'all' or a comma-separated list, as --targets takes it
    output: Path
    max_latency_ms: float | None = None  # a latency limit (--max-latency-ms); None: the target's latency is a goal
    preprocess: str | None = None  # how image folders become inputs (--preprocess)

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def source(self) -> str:
        """How messages name the file."""
        return f"{self.path} [{self.table}]" if self.table else str(self.path)

    def record(self) -> dict[str, str]:
        """What an artifact's manifest records about the project file it was built from."""
        return {"path": str(self.path), "sha256": self.sha256, **({"table": self.table} if self.table else {})}

    def build_dir(self, target: str) -> Path:
        """Where ``edgeopt build --target TARGET`` writes (and ``edgeopt profile --target TARGET`` reads)."""
        return self.output / output_name(target)

    def fleet_dir(self) -> Path:
        return self.output / FLEET_FOLDER


# --------------------------------------------------------------------------- reading


def _read_bytes(path: Path, what: str) -> bytes:
    from .io import read_small_file

    return read_small_file(path, MAX_PROJECT_FILE_BYTES, ProjectFileError, what, "a project file is a few lines of YAML")


def _decode(raw: bytes, path: Path, what: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ProjectFileError(f"{what} {path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None


def _check_tree(data: Any, source: str) -> None:
    """Refuse non-string keys, deep nesting and more than :data:`MAX_NODES` values (walked iteratively: a YAML alias
    bomb stops after MAX_NODES values)."""
    stack: list[tuple[Any, tuple[str, ...]]] = [(data, ())]
    nodes = 0
    while stack:
        v, where = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise ProjectFileError(f"project file {source} holds more than {MAX_NODES:,} values (YAML aliases?)")
        if len(where) > MAX_DEPTH:
            raise ProjectFileError(f"project file {source}: {'.'.join(where[:4])}...: nested too deeply")
        if isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str):
                    raise ProjectFileError(f"project file {source}: {'.'.join(where) or '(top level)'}: key {_show(k)} "
                                           "is not a string")
                stack.append((x, (*where, k)))
        elif isinstance(v, list):
            stack.extend((x, (*where, str(i))) for i, x in enumerate(v))


def _read_yaml(path: Path) -> tuple[dict[str, Any], str]:
    import yaml

    raw = _read_bytes(path, "project file")
    text = _decode(raw, path, "project file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ProjectFileError(f"project file {path} is not valid YAML: {str(e).splitlines()[0]}"
                               + _yaml_where(e)) from None
    except RecursionError:
        raise ProjectFileError(f"project file {path}: nested too deeply") from None
    if data is None:
        data = {}  # an empty file (or only comments): every default
    if not isinstance(data, dict):
        raise ProjectFileError(f"project file {path} must hold a mapping (model: ..., target: ...), not a "
                               f"{type(data).__name__}; see 'edgeopt init'")
    return data, hashlib.sha256(raw).hexdigest()


def _yaml_where(e: Exception) -> str:
    mark = getattr(e, "problem_mark", None)
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


def _read_pyproject(path: Path) -> tuple[dict[str, Any], str] | None:
    """``[tool.edgeopt]`` of a pyproject.toml and the file's sha256, or None when it has no such table."""
    raw = _read_bytes(path, PYPROJECT)
    text = _decode(raw, path, PYPROJECT)
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            if re.search(r"^\s*\[\s*tool\s*\.\s*edgeopt\s*[\].]", text, re.M):
                raise ProjectFileError(f"{path} has a [tool.edgeopt] table but this Python ({sys.version.split()[0]}) "
                                       "cannot read TOML: pip install tomli, or use an edgeopt.yaml") from None
            return None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ProjectFileError(f"{path} is not valid TOML: {str(e).splitlines()[0]}") from None
    table = doc.get("tool", {}).get("edgeopt") if isinstance(doc.get("tool"), dict) else None
    if table is None:
        return None
    if not isinstance(table, dict):
        raise ProjectFileError(f"{path}: [tool.edgeopt] must be a table (model = ..., target = ...)")
    return table, hashlib.sha256(raw).hexdigest()


def _validate(data: dict[str, Any], source: str):
    from pydantic import ValidationError

    model = _file_model()
    keys = list(model.model_fields)
    unknown = [k for k in data if k not in keys]
    if unknown:
        close = difflib.get_close_matches(unknown[0], keys, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ProjectFileError(f"project file {source}: unknown key {_show(unknown[0])}{hint}; valid keys: {', '.join(keys)}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        msg = first["msg"].replace("Value error, ", "")
        got = first.get("input")
        if first["type"] != "value_error":
            msg += f" (got {_show(got)})"
        more = f" (+{e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise ProjectFileError(f"project file {source}: {where}: {msg}{more}") from None


def _path(root: Path, value: str | None, key: str, source: str, *, must_exist: bool = True, file: bool = False) -> Path | None:
    if value is None:
        return None
    p = Path(os.path.expanduser(value))
    full = p if p.is_absolute() else root / p
    if must_exist:
        try:
            ok = full.is_file() if file else full.exists()
        except (OSError, ValueError):
            ok = False
        if not ok:
            kind = "is not a file" if file and full.exists() else "does not exist"
            raise ProjectFileError(f"project file {source}: {key}: {value} ({full}) {kind}; paths are relative to the "
                                   "project file's folder")
    return full


def load_project(path: str | Path, *, table: str | None = None) -> Project:
    """Read and validate a project file: an ``edgeopt.yaml``, or a ``pyproject.toml``'s ``[tool.edgeopt]``.

    Raises:
        ProjectFileError: the file is missing, not a regular file, over 1 MiB, not UTF-8, not YAML (TOML), holds an
            unknown key or a bad value, or names a model or data path that does not exist (relative to its folder).
    """
    path = Path(path).absolute()
    if path.name == PYPROJECT or table is not None:
        found = _read_pyproject(path)
        if found is None:
            raise ProjectFileError(f"{path} has no [tool.edgeopt] table")
        data, sha = found
        table = "tool.edgeopt"
    else:
        data, sha = _read_yaml(path)
    source = f"{path} [{table}]" if table else str(path)
    _check_tree(data, source)
    pf = _validate(data, source)
    root = path.parent
    model = pf.model if pf.model == DEFAULT_MODEL else str(_path(root, pf.model, "model", source, file=True))
    data_keys = [k for k in ("calib", "eval", "labels", "inputs") if getattr(pf, k) is not None]
    if model == DEFAULT_MODEL and data_keys:
        raise ProjectFileError(f"project file {source}: model '{DEFAULT_MODEL}' (the embedded digits CNN) brings its own "
                               f"data; remove {', '.join(data_keys)} or name your model")
    if model == DEFAULT_MODEL and pf.input_shapes:
        raise ProjectFileError(f"project file {source}: model '{DEFAULT_MODEL}' has static input shapes; remove "
                               "input_shapes or name your model")
    shapes = tuple(f"{n}={d if isinstance(d, str) else 'x'.join(map(str, d))}" for n, d in pf.input_shapes.items())
    targets = pf.targets
    if isinstance(targets, list):
        targets = ",".join(t.strip() for t in targets)
    if targets is not None and targets.strip() != "all":
        targets = ",".join(_target_ref(root, t.strip()) for t in targets.split(",") if t.strip())
    return Project(path=path, sha256=sha, table=table, model=model, input_shapes=shapes,
                   calib=_path(root, pf.calib, "calib", source), eval_data=_path(root, pf.eval, "eval", source),
                   labels=_path(root, pf.labels, "labels", source, file=True),
                   inputs=_path(root, pf.inputs, "inputs", source, file=True),
                   max_accuracy_drop=pf.max_accuracy_drop, min_snr_db=pf.min_snr_db, objective=pf.objective,
                   target=_target_ref(root, pf.target) if pf.target else None, targets=targets,
                   output=_path(root, pf.output, "output", source, must_exist=False),
                   max_latency_ms=pf.max_latency_ms, preprocess=pf.preprocess)


def _target_ref(root: Path, name: str) -> str:
    """A target as the project names it: a built-in name unchanged, a target file resolved against the project."""
    if _looks_like_path(name) and not Path(name).is_absolute():
        return str(root / name)
    return name


def find_project(folder: str | Path | None = None, explicit: str | Path | None = None) -> Project | None:
    """The project of ``folder`` (default: the current folder): its ``edgeopt.yaml``, else its ``pyproject.toml``'s
    ``[tool.edgeopt]`` table, else None.  ``explicit`` names the file instead (it must exist)."""
    if explicit is not None:
        p = Path(explicit)
        if not p.exists():
            raise ProjectFileError(f"project file {p} does not exist; 'edgeopt init' writes one")
        return load_project(p)
    folder = Path(folder) if folder is not None else Path.cwd()
    yml = folder / PROJECT_FILE
    if os.path.lexists(yml):
        return load_project(yml)
    pyproject = folder / PYPROJECT
    if pyproject.is_file() and _read_pyproject(pyproject) is not None:
        return load_project(pyproject)
    return None


# --------------------------------------------------------------------------- resolving a command's settings


@dataclass(frozen=True)
class Settings:
    """What one command runs with: explicit arguments, else the project file's values, else the defaults."""

    model: str | None  # a path, or DEFAULT_MODEL; None only where the command needs no model
    input_shapes: list[str] | None
    calib: Path | None
    eval_data: Path | None
    labels: Path | None
    inputs: Path | None
    max_accuracy_drop: float | None
    min_snr_db: float | None
    objective: str
    target: str | None
    targets: str
    output: Path | None
    project: Project | None
    max_latency_ms: float | None = None
    preprocess: str | None = None


def resolve(project: Project | None, *, model: str | Path | None = None, input_shapes: list[str] | None = None,
            calib: Path | None = None, eval_data: Path | None = None, labels: Path | None = None,
            inputs: Path | None = None, max_accuracy_drop: float | None = None, min_snr_db: float | None = None,
            objective: str | None = None, target: str | None = None, targets: str | None = None,
            max_latency_ms: float | None = None, preprocess: str | None = None, output: Path | None = None, output_for: Literal["build", "fleet"] | None = None,
            need_model: bool = True, need_target: bool = False) -> Settings:
    """Merge explicit arguments (None: not given) with a project's values.

    An explicit value wins over the project's.  A model given explicitly replaces the project's model *and* the data
    that belongs to it (input shapes, calibration, evaluation, labels, inputs): those then come only from the
    arguments.  The budget, objective, targets and output folder still come from the project.

    Args:
        project: the project file (:func:`find_project`), or None.
        output_for: ``build`` derives the output folder ``<output>/<target>``, ``fleet`` ``<output>/fleet``, when
            ``output`` is not given (a project is then needed).
        need_model: refuse when neither the arguments nor a project name a model.
        need_target: refuse when neither the arguments nor the project name a target.

    Raises:
        EdgeoptError: no model (and no project), no target, or no output folder, each saying how to give one.
    """
    use_project_data = project is not None and model is None
    if model is None and project is not None:
        model = project.model
    if model is None and need_model:
        raise EdgeoptError(NO_PROJECT_HINT if project is None else "no model given")
    p = project if use_project_data else None
    if target is None and project is not None:
        target = project.target
    if target is None and need_target:
        where = f"or set 'target: NAME' in {project.source}" if project is not None else \
            f"or set 'target:' in an {PROJECT_FILE} ('edgeopt init --target NAME')"
        raise EdgeoptError(f"no target given: pass --target NAME ({where}); 'edgeopt targets list' shows them")
    if output is None and output_for is not None:
        if project is None:
            raise EdgeoptError(f"no output folder: pass -o/--output DIR (or run in a project folder with an "
                               f"{PROJECT_FILE}, where it defaults to build/: 'edgeopt init')")
        output = project.build_dir(target) if output_for == "build" else project.fleet_dir()
    return Settings(
        model=str(model) if model is not None else None,
        input_shapes=list(input_shapes) if input_shapes else (list(p.input_shapes) if p and p.input_shapes else None),
        calib=calib if calib is not None else (p.calib if p else None),
        eval_data=eval_data if eval_data is not None else (p.eval_data if p else None),
        labels=labels if labels is not None else (p.labels if p else None),
        inputs=inputs if inputs is not None else (p.inputs if p else None),
        max_accuracy_drop=max_accuracy_drop if max_accuracy_drop is not None else (
            project.max_accuracy_drop if project else None),
        min_snr_db=min_snr_db if min_snr_db is not None else (project.min_snr_db if project else None),
        objective=objective or (project.objective if project and project.objective else "latency"),
        target=target,
        targets=targets or (project.targets if project and project.targets else "all"),
        output=output,
        project=project,
        max_latency_ms=max_latency_ms if max_latency_ms is not None else (project.max_latency_ms if project else None),
        preprocess=preprocess or (p.preprocess if p else None),
    )


# --------------------------------------------------------------------------- edgeopt init


def _yaml_scalar(s: str) -> str:
    return s if re.fullmatch(r"[A-Za-z0-9_./][A-Za-z0-9_./-]*", s) and s not in ("null", "true", "false", "yes", "no",
                                                                                  "on", "off", "y", "n", "~") \
        else json.dumps(s)


def project_text(model: str = DEFAULT_MODEL, target: str | None = None, targets: list[str] | None = None) -> str:
    """A commented ``edgeopt.yaml`` naming ``model`` (a path relative to the file, or ``default``), an optional
    default target and the fleet's targets."""
    d = "# "  # the data keys are offered commented out: uncomment them once the files exist
    fleet = "all" if not targets else "[" + ", ".join(_yaml_scalar(t) for t in targets) + "]"
    return f"""\
# edgeopt project file. Inside this folder `edgeopt build --target NAME`, `edgeopt fleet`,
# `edgeopt plan`, `edgeopt analyze` and `edgeopt profile --target NAME` read their settings
# from here; options given on the command line win. Paths are relative to this file.
# A model given on the command line replaces `model` and its data (input_shapes, calib,
# eval, labels, inputs). Every key but `model` is optional.

# The ONNX model to optimize, or 'default': the embedded digits CNN (8x8 images, 10 classes),
# which brings its own calibration and labelled evaluation data.
model: {_yaml_scalar(model)}

# Your model's data (uncomment what you have; the embedded 'default' model needs none of it).
# Static shapes for inputs with dynamic dims (a leading batch dim becomes 1 by itself).
{d}input_shapes:
{d}  x: 1x3x224x224

# Calibration data: a folder of .npy/.npz files, or one .npy/.npz file (samples on the first axis),
# or a folder of JPEG/PNG images read with `preprocess` (imagenet, unit or raw), or of WAV files.
{d}calib: data/calib/
{d}preprocess: imagenet
# Held-out inputs the accuracy is measured on (default: the calibration data).
{d}eval: data/eval.npz
# .npy integer labels of the eval (else calib) samples: accuracy instead of agreement with the original.
{d}labels: data/labels.npy
# One run's inputs (.npz, or .npy for one input) for the smoke run and timing (default: the first sample).
{d}inputs: data/sample.npz

# The accuracy budget: the top-1 accuracy the plan may lose (with labels; else top-1 agreement
# with the original; default 0.01), and an output SNR floor in dB for models without class
# scores (default 30). The build checks it on the artifact.
# max_accuracy_drop: 0.01
# min_snr_db: 30
# A latency limit in ms (plans predicted slower are refused); without it the target's latency is a goal.
# max_latency_ms: 20

# latency: the fastest plan within the budget; fidelity: the most faithful plan within the target's budgets.
objective: latency

# The target `build`, `plan`, `analyze` and `profile` use when no --target is given
# ('edgeopt targets list' shows them; a path to a target .yaml works too).
{"" if target else "# "}target: {_yaml_scalar(target) if target else "jetson-orin"}

# The targets of `edgeopt fleet`: all, or a list like [jetson-orin, x86-cpu, mcu-cortex-m7].
targets: {fleet}

# Where builds go: `edgeopt build --target NAME` writes <output>/NAME/ (what
# `edgeopt profile <output>/NAME` measures), `edgeopt fleet` writes <output>/fleet/.
output: build
"""


def init_project(path: str | Path, *, model: str | Path | None = None, target: str | None = None,
                 targets: list[str] | None = None, force: bool = False) -> Project:
    """Write a commented project file at ``path`` (atomically) and return it, loaded.

    Args:
        model: the model file (relative paths are taken from the current folder and stored relative to the
            project file's folder), or None / ``default`` for the embedded digits CNN.
        target: the default target (checked to load).
        targets: the fleet's targets (checked to load); None: all.
        force: replace an existing file.

    Raises:
        EdgeoptError: the file exists (without ``force``), the model file does not exist, or a target is unknown.
    """
    from .io import atomic_write_text
    from .targets import HOST, load_target

    path = Path(path).absolute()
    if path.name == PYPROJECT:
        raise ProjectFileError(f"edgeopt init writes a YAML project file, not {PYPROJECT}; add a [tool.edgeopt] table "
                               "to it by hand (the keys of edgeopt.yaml), or init an edgeopt.yaml")
    if os.path.lexists(path) and not force:
        raise ProjectFileError(f"{path} already exists; edit it, or pass --force to replace it")
    if os.path.lexists(path) and not path.is_file():
        raise ProjectFileError(f"{path} exists and is not a regular file; remove it first")
    stored = DEFAULT_MODEL
    if model is not None and str(model) != DEFAULT_MODEL:
        m = Path(model).absolute()
        if not m.is_file():
            raise EdgeoptError(f"model {model} does not exist (or is not a file)")
        try:
            stored = Path(os.path.relpath(m, path.parent)).as_posix()
        except ValueError:  # another drive (Windows)
            stored = str(m)
    for name in [*([target] if target else []), *(targets or [])]:
        if name != HOST:  # 'host' runs a micro-benchmark on first load; it is always valid
            load_target(name)
    fleet = None if targets is None or targets == ["all"] else targets
    text = project_text(stored, target, fleet)
    atomic_write_text(path, text)
    return load_project(path)
