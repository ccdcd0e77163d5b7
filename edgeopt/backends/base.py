"""The protocol every backend implements, and the artifact/manifest helpers they share.

A backend module (``edgeopt/backends/<name>.py``) keeps its op table and
``check_ops`` at module level (pure data, used by the planner) and exposes
``BACKEND``, an instance of a :class:`Backend` subclass:

* ``is_available()``: its SDK can be imported here;
* ``check(plan, analysis) -> reasons``: why it cannot build this plan (empty: it can);
* ``convert(model, plan, out_dir, calib) -> Artifact``: writes the artifact's files into
  ``out_dir`` (the caller makes that directory atomic) and returns the manifest;
  ``model`` is the float ONNX model after the plan's structural passes; the
  backend applies the plan's numeric formats (precisions) in its own way;
* ``load(artifact, artifact_dir, threads=None) -> Runner``: a runner that executes the
  artifact here (``threads``: intra-op threads, for backends whose runtime takes them,
  ``threaded``; None: the artifact's own setting), or a
  :class:`~edgeopt.errors.BackendNotInstalledError` / :class:`RuntimeUnavailable`
  saying why it cannot;
* ``runtime_dist``: the Python distribution that provides the runtime (profiles record its version);
* ``precisions`` / ``sparsity``: the techniques it writes (None: any technique that can be written into the
  ONNX graph; see :mod:`edgeopt.technique`).

Vendor SDKs are imported inside methods only.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import platform
from abc import ABC, abstractmethod
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import BackendNotInstalledError, EdgeoptError
from ..types import Artifact, ModelAnalysis, OpTiming, Plan

if TYPE_CHECKING:  # pragma: no cover
    import onnx

    from ..calibration import CalibrationData

MANIFEST = "manifest.json"


class RuntimeUnavailable(EdgeoptError):
    """The artifact was built, but its runtime cannot execute here (e.g. Core ML off macOS)."""


class Runner(ABC):
    """Executes one artifact; inputs and outputs are numpy arrays in the ONNX model's layout."""

    input_names: list[str]
    output_names: list[str]

    @abstractmethod
    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run the artifact once.

        Args:
            feeds: input name -> array, in the ONNX model's layout and dtype.

        Returns:
            The outputs, in the order of ``output_names``, in the ONNX model's layout.
        """
        ...

    def op_profile(self, feeds: Mapping[str, np.ndarray], repeats: int = 20) -> list[OpTiming]:
        """Per-op timings averaged over ``repeats`` runs (empty where the runtime has no counters).

        Args:
            feeds: input name -> array, as :meth:`run` takes them.
            repeats: runs to average over.

        Returns:
            One timing per op the runtime reports; this default returns an empty list.
        """
        return []

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the runtime's resources (a no-op by default); the runner is not used afterwards."""
        pass

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Backend(ABC):
    name: str
    sdk_modules: tuple[str, ...]
    sdk_label: str
    #: the Python distribution that provides the runtime
    runtime_dist: str
    #: whether ``load`` takes a thread count (the runtime runs intra-op threads we can fix)
    threaded: bool = False
    #: threads a runtime without that setting runs with (0: its own choice)
    default_threads: int = 0
    #: False where convert() writes SDK-ready files without the SDK (TensorRT: ONNX + engine build step)
    convert_requires_sdk: bool = True
    #: precisions (techniques in :mod:`edgeopt.technique`) convert() writes in the backend's own format; None: any
    #: technique with an ``apply`` hook, written into the ONNX graph (onnxruntime)
    precisions: frozenset[str] | None = None
    #: pruning patterns it honours (all pruning is applied to the ONNX graph before convert; a format may store it
    #: compactly or run it faster, which the target's ``sparsity`` entries say)
    sparsity: frozenset[str] | None = None
    #: whether the runtime computes every float layer of a model in one format (OpenVINO's inference precision)
    uniform_float: bool = False
    #: whether int8 layers are written by edgeopt's int8 pass (so ``Plan.technique_configs["int8"]`` applies)
    uses_int8_pass: bool = False
    #: int8 pass settings the backend's format requires (they win over the plan's ``technique_configs``)
    int8_config: Mapping[str, object] = {}

    def writes(self, technique: str) -> bool:
        """Whether convert() can produce a layer in ``technique`` (a precision or a sparsity pattern).

        Args:
            technique: a technique name from :mod:`edgeopt.technique`.

        Returns:
            True when the backend declares it in ``precisions``/``sparsity``, or, where that is None,
            when the technique has an ``apply`` hook (it can be written into the ONNX graph).
        """
        from ..technique import get

        t = get(technique)
        declared = self.precisions if t.kind == "precision" else self.sparsity
        return t.apply is not None if declared is None else technique in declared

    def is_available(self) -> bool:
        """Whether the backend's SDK can be imported here.

        Returns:
            True when every module in ``sdk_modules`` is importable (checked without importing it).
        """
        from importlib.util import find_spec

        return all(find_spec(m) is not None for m in self.sdk_modules)

    def require(self) -> None:
        """Check that the backend's SDK is installed.

        Raises:
            BackendNotInstalledError: a module in ``sdk_modules`` cannot be imported.
        """
        if not self.is_available():
            raise BackendNotInstalledError(self.name, self.sdk_label)

    def check(self, plan: Plan, analysis: ModelAnalysis) -> list[str]:
        """Reasons this backend cannot build ``plan`` for ``analysis`` (empty: it can).

        Args:
            plan: the plan to build.
            analysis: the model the plan is for.

        Returns:
            One reason per problem: the plan is for another backend, a layer's op is unsupported on the
            plan's backend option, or a precision/sparsity the plan uses is one this backend cannot write.

        Raises:
            EdgeoptError: the plan's target has no backend option matching the plan's backend, unit and options.
        """
        from . import get

        reasons = []
        if plan.backend != self.name:
            reasons.append(f"the plan is for backend {plan.backend}, not {self.name}")
        option = _option_for(plan)
        reasons += get(self.name).check_ops(analysis, option)
        used = {lp.precision for lp in plan.layers} | {lp.sparsity for lp in plan.layers if lp.sparsity != "none"}
        reasons += [f"{self.name} cannot write {t} layers" for t in sorted(used) if not self.writes(t)]
        return reasons

    @abstractmethod
    def convert(self, model: onnx.ModelProto, plan: Plan, out_dir: Path,
                calib: CalibrationData | None = None) -> Artifact:
        """Write the artifact's files for ``plan`` into ``out_dir``.

        Implementations apply the plan's per-layer precisions in the backend's own format and
        build the manifest with :func:`make_artifact`; they do not write the manifest file (the
        caller does, and makes ``out_dir`` atomic).

        Args:
            model: the float ONNX model, after the plan's structural (pruning) passes.
            plan: the plan to build; its backend is this one.
            out_dir: an existing, empty directory to write into.
            calib: calibration data for formats that need activation ranges (int8), or None.

        Returns:
            The artifact's manifest (file hashes, primary file, plan, tool versions).

        Raises:
            BackendNotInstalledError: the SDK the conversion needs is not installed.
        """
        ...

    @abstractmethod
    def load(self, artifact: Artifact, artifact_dir: Path, threads: int | None = None) -> Runner:
        """A runner that executes the artifact on this machine.

        Args:
            artifact: the artifact's manifest.
            artifact_dir: the directory holding its files.
            threads: intra-op threads, for ``threaded`` backends; None: the artifact's own setting.

        Returns:
            A runner for the artifact; the caller closes it.

        Raises:
            BackendNotInstalledError: the runtime is not installed.
            RuntimeUnavailable: the runtime cannot execute here (e.g. no suitable OS or device).
            EdgeoptError: ``threads`` is given for a backend that is not ``threaded``.
        """
        ...

    def artifact_threads(self, artifact: Artifact, artifact_dir: Path) -> int | None:
        """The thread count the artifact records for its runtime (None: none recorded, or not ``threaded``).

        Args:
            artifact: the artifact's manifest.
            artifact_dir: the directory holding its files.

        Returns:
            The recorded thread count, or None; this default returns None.
        """
        return None

    def _no_threads(self, threads: int | None) -> None:
        if threads:
            from . import BACKENDS, get

            threaded = [b for b in BACKENDS if get(b).BACKEND.threaded]
            raise EdgeoptError(f"--threads applies to {', '.join(threaded)} artifacts; {self.name} runs with its own "
                               "setting (leave --threads out)")

    def reference(self, artifact: Artifact, artifact_dir: Path) -> Runner | None:
        """A runner with the artifact's exact numerics that does not depend on this machine's kernels (QDQ graphs run
        as written: quantize, dequantize, float ops), or None where the backend has no such stand-in.

        Args:
            artifact: the artifact's manifest.
            artifact_dir: the directory holding its files.

        Returns:
            The reference runner (the caller closes it), or None; this default returns None.
        """
        return None


def _option_for(plan: Plan):
    """The target backend option a plan was made for."""
    target = plan.target_definition
    for o in target.backends:
        if o.backend == plan.backend and o.unit == plan.unit and dict(o.options) == dict(plan.backend_options):
            return o
    raise EdgeoptError(f"target {plan.target} has no backend option {plan.backend}/{plan.unit} {plan.backend_options}")


def int8_scheme_for(plan: Plan):
    """The int8 layout the plan's compute unit runs exactly (:func:`edgeopt.hostinfo.int8_scheme`), or None for
    units that are not CPUs with a known ISA (GPUs, NPUs, MCUs: the backend's own rules apply).

    Args:
        plan: the plan; its target definition's compute unit ``plan.unit`` is looked up.

    Returns:
        The int8 scheme for the plan's backend and the unit's arch/ISA, or None when the unit has no ``arch``.
    """
    from ..hostinfo import int8_scheme

    unit = plan.target_definition.compute_units[plan.unit]
    return int8_scheme(plan.backend, unit.arch, unit.isa) if unit.arch else None


def int8_layout(scheme) -> dict:
    """The int8 pass settings an int8 scheme fixes (from :func:`int8_scheme_for` or
    :func:`edgeopt.hostinfo.int8_scheme`): weight bits and activation type; full-range weights where there is no
    scheme (GPUs, NPUs, MCUs).

    Args:
        scheme: the scheme, or None.

    Returns:
        ``{"weight_bits": ..., "activation_type": ...}`` (only ``weight_bits`` without a scheme).
    """
    if scheme is None:
        return {"weight_bits": 8}
    return {"weight_bits": scheme.weight_bits, "activation_type": scheme.activation_type}


def int8_numerics(plan: Plan, scheme) -> dict[str, str]:
    """Manifest lines for a plan's int8 layout (empty when no layer is int8).

    Args:
        plan: the plan.
        scheme: the int8 scheme from :func:`int8_scheme_for`, or None.

    Returns:
        ``int8_scheme`` and ``int8_reason`` entries for the manifest's ``numerics`` ("backend defaults"
        when ``scheme`` is None), or an empty dict.
    """
    if not any(lp.precision == "int8" for lp in plan.layers):
        return {}
    if scheme is None:
        return {"int8_scheme": "backend defaults", "int8_reason": f"{plan.target}/{plan.unit} is not a CPU with a known ISA"}
    return {"int8_scheme": f"{scheme.activation_type} activations, {scheme.weight_bits}-bit weights ({scheme.kernel_class})",
            "int8_reason": scheme.reason}


def sha256_of(path: Path) -> str:
    """SHA-256 of a file's contents, read in 1 MiB blocks.

    Args:
        path: the file.

    Returns:
        The hex digest.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def tool_versions(*packages: str) -> dict[str, str]:
    """Versions of Python and the installed tools an artifact was built with, for its manifest.

    Args:
        packages: distributions to record besides edgeopt, onnx and onnxruntime.

    Returns:
        ``python`` and distribution name -> version; distributions that are not installed are left out.
    """
    out = {"python": platform.python_version()}
    for p in ("edgeopt", "onnx", "onnxruntime", *packages):
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return out


def read_settings_file(artifact_dir: Path, name: str, keys: tuple[str, ...], backend: str) -> dict:
    """An artifact's JSON settings file (e.g. OpenVINO's compile.json, TensorRT's build.json) as an object whose keys
    are all among ``keys``; the caller checks the values.

    Raises:
        EdgeoptError: the file is missing, not JSON, not an object, or has an unknown key (named, with the valid ones).
    """
    import json

    try:
        data = json.loads((Path(artifact_dir) / name).read_bytes())
    except FileNotFoundError:
        raise EdgeoptError(f"{backend} artifact {artifact_dir} has no {name}") from None
    except (OSError, ValueError) as e:
        raise EdgeoptError(f"{name} is not readable JSON: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise EdgeoptError(f"{name} must hold a JSON object with keys {', '.join(keys)}")
    unknown = [k for k in data if k not in keys]
    if unknown:
        raise EdgeoptError(f"{name}: unknown key {str(unknown[0])[:100]!r}; valid keys: {', '.join(keys)}")
    return data


def make_artifact(out_dir: Path, primary: str, plan: Plan, backend: str, versions: dict[str, str],
                  accuracy: dict[str, float] | None = None, numerics: dict[str, str] | None = None,
                  renderings: tuple[str, ...] = ()) -> Artifact:
    """Hash every file under ``out_dir`` (but the manifest) into an :class:`Artifact`.

    Args:
        out_dir: the directory the backend wrote the artifact's files into.
        primary: the artifact's main file (or directory, e.g. a Core ML package), relative to ``out_dir``.
        plan: the plan the artifact was built from (gives its target and predicted latency).
        backend: the backend's name.
        versions: tool versions (see :func:`tool_versions`).
        accuracy: accuracy metrics the backend measured itself, if any.
        numerics: notes on the artifact's numerics (e.g. :func:`int8_numerics`), if any.
        renderings: files that are another form of files already counted (TFLM's ``model_data.cc``: the .tflite
            as C source); hashed, not counted in ``size_bytes``, which is what the device stores.

    Returns:
        The manifest: relative path -> sha256 of every file, the size the device stores, and the given details,
        stamped with the current UTC time.

    Raises:
        EdgeoptError: ``primary`` was not written.
    """
    files = {p.relative_to(out_dir).as_posix(): sha256_of(p) for p in sorted(out_dir.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    if primary not in files and not (out_dir / primary).is_dir():
        raise EdgeoptError(f"backend {backend} did not write its primary file {primary}")
    size = sum((out_dir / f).stat().st_size for f in files if f not in renderings)
    return Artifact(target=plan.target, backend=backend, files=files, primary=primary, size_bytes=size, plan=plan,
                    tool_versions=versions, predicted_latency_ms=plan.predicted_latency_ms, accuracy=accuracy or {},
                    numerics=numerics or {},
                    created_utc=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))


def write_manifest(artifact: Artifact, out_dir: Path) -> Path:
    """Write the artifact's manifest (``manifest.json``) into ``out_dir`` atomically.

    Args:
        artifact: the manifest.
        out_dir: the artifact's directory.

    Returns:
        The manifest file's path.
    """
    from ..io import atomic_write_text

    path = out_dir / MANIFEST
    atomic_write_text(path, artifact.model_dump_json(indent=2) + "\n")
    return path


def artifact_path(artifact_dir: Path, rel: object, what: str = "path") -> Path:
    """``artifact_dir / rel`` for a path an artifact's manifest (or one of its files) names, after checking that it
    stays inside the artifact: a relative POSIX path, no ``..``, no absolute path, drive, backslash or NUL, and,
    once symlinks are resolved, still inside ``artifact_dir``.

    Args:
        artifact_dir: the artifact's directory.
        rel: the path as the manifest gives it.
        what: what the path is, for the error (e.g. ``primary``).

    Returns:
        The path joined onto ``artifact_dir`` (not resolved).

    Raises:
        EdgeoptError: the path is not a string, or it could leave the artifact's directory.
    """
    from pathlib import PurePosixPath

    def bad(why: str) -> EdgeoptError:
        return EdgeoptError(f"{artifact_dir}/{MANIFEST}: {what} {str(rel)[:200]!r} {why}; paths in a manifest are "
                            "relative POSIX paths inside the artifact's directory")

    if not isinstance(rel, str) or not rel:
        raise bad("is not a relative path")
    if "\\" in rel or any(ord(c) < 32 for c in rel):
        raise bad("has a backslash or control character")
    p = PurePosixPath(rel)
    if p.is_absolute() or rel.startswith("/"):
        raise bad("is absolute")
    if len(rel) >= 2 and rel[1] == ":" and rel[0].isalpha():
        raise bad("has a drive letter")
    if ".." in p.parts:
        raise bad("has a '..' component")
    if not p.parts or p.parts == (".",):
        raise bad("names the artifact's directory itself")
    root = Path(artifact_dir)
    try:
        inside = (root / p).resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a symlink loop, a name too long
        inside = False
    if not inside:
        raise bad("resolves outside the artifact's directory (a symlink?)")
    return root / p


def check_manifest_paths(artifact: Artifact, artifact_dir: Path) -> None:
    """Check ``primary`` and every key of ``files`` with :func:`artifact_path`; ``primary`` must also be one of the
    files or a directory holding some of them (the manifest's hashes then cover what a runtime loads).

    Args:
        artifact: the manifest.
        artifact_dir: the artifact's directory.

    Raises:
        EdgeoptError: a path could leave the artifact's directory, or ``primary`` is not among the files.
    """
    for rel in artifact.files:
        artifact_path(artifact_dir, rel, "file")
    artifact_path(artifact_dir, artifact.primary, "primary")
    prefix = artifact.primary.rstrip("/") + "/"
    if artifact.primary not in artifact.files and not any(f.startswith(prefix) for f in artifact.files):
        raise EdgeoptError(f"{artifact_dir}/{MANIFEST}: primary {artifact.primary[:200]!r} is not one of the "
                           "artifact's files (nor a directory of them)")


def read_manifest(artifact_dir: Path) -> Artifact:
    """Read an artifact's manifest (without checking its files' hashes; see :func:`read_verified`).

    Args:
        artifact_dir: the artifact's directory.

    Returns:
        The parsed manifest; its ``primary`` and ``files`` paths stay inside ``artifact_dir``
        (see :func:`check_manifest_paths`).

    Raises:
        EdgeoptError: the directory has no ``manifest.json``, it is not a valid manifest, or a path it names
            could leave the artifact's directory.
    """
    from pydantic import ValidationError

    path = Path(artifact_dir) / MANIFEST
    if not path.is_file():
        raise EdgeoptError(f"{artifact_dir} is not an edgeopt artifact (no {MANIFEST})")
    try:
        artifact = Artifact.model_validate_json(path.read_bytes())
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(map(str, err.get("loc", ()))) or "the file"
        raise EdgeoptError(f"{path} is not a valid manifest: {where}: {err['msg']}") from None
    except OSError as e:
        raise EdgeoptError(f"cannot read {path}: {e.strerror or e}") from None
    check_manifest_paths(artifact, artifact_dir)
    return artifact


def verify_files(artifact: Artifact, artifact_dir: Path) -> list[str]:
    """Files whose hash no longer matches the manifest (missing ones included).

    Args:
        artifact: the manifest.
        artifact_dir: the artifact's directory.

    Returns:
        The manifest's relative paths that are missing or changed (empty: all intact).

    Raises:
        EdgeoptError: a path in the manifest could leave the artifact's directory (see :func:`artifact_path`).
    """
    bad = []
    for rel, digest in artifact.files.items():
        p = artifact_path(artifact_dir, rel, "file")
        if not p.is_file() or sha256_of(p) != digest:
            bad.append(rel)
    return bad


def build_artifact(model: onnx.ModelProto, plan: Plan, out_dir: Path, calib: CalibrationData | None = None) -> Artifact:
    """Convert ``model`` with the plan's backend into ``out_dir`` atomically (all or nothing), manifest included.

    Args:
        model: the float ONNX model, after the plan's structural passes.
        plan: the plan; ``plan.backend`` does the conversion.
        out_dir: the destination directory (replaced on success).
        calib: calibration data for formats that need it, or None.

    Returns:
        The artifact's manifest, as written to ``out_dir``.

    Raises:
        EdgeoptError: the plan's backend is unknown.
        BackendNotInstalledError: the backend needs its SDK to convert and it is not installed.
    """
    from ..io import atomic_dir
    from . import get

    backend = get(plan.backend).BACKEND
    if backend.convert_requires_sdk:
        backend.require()
    with atomic_dir(out_dir) as tmp:
        artifact = backend.convert(model, plan, tmp, calib)
        write_manifest(artifact, tmp)
    return artifact


def read_verified(artifact_dir: Path) -> Artifact:
    """An artifact's manifest, after checking that its files still have the hashes it records.

    Args:
        artifact_dir: the artifact's directory.

    Returns:
        The parsed manifest.

    Raises:
        EdgeoptError: the manifest is missing or invalid, or a file it lists is missing or changed.
    """
    artifact = read_manifest(artifact_dir)
    bad = verify_files(artifact, artifact_dir)
    if bad:
        raise EdgeoptError(f"artifact {artifact_dir} is damaged: {', '.join(bad)} missing or changed since it was built")
    return artifact


def open_reference(artifact_dir: Path) -> Runner | None:
    """The backend's exact-numerics stand-in for an artifact (see :meth:`Backend.reference`), or None.

    Args:
        artifact_dir: the artifact's directory.

    Returns:
        The reference runner (the caller closes it), or None where the backend has none.

    Raises:
        EdgeoptError: the artifact's manifest is missing or invalid, or its files are damaged.
    """
    from . import get

    artifact = read_verified(artifact_dir)
    return get(artifact.backend).BACKEND.reference(artifact, Path(artifact_dir))


def open_artifact(artifact_dir: Path) -> tuple[Artifact, Runner]:
    """Read an artifact's manifest, check its files' hashes, and load it in its backend's runtime.

    Args:
        artifact_dir: the artifact's directory.

    Returns:
        (the manifest, a runner for the artifact with its own thread setting; the caller closes it).

    Raises:
        EdgeoptError: the manifest is missing or invalid, or the artifact's files are damaged.
        BackendNotInstalledError: the artifact's runtime is not installed.
        RuntimeUnavailable: the runtime cannot execute here.
    """
    from . import get

    artifact = read_verified(artifact_dir)
    return artifact, get(artifact.backend).BACKEND.load(artifact, Path(artifact_dir))
