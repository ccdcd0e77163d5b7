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
* ``runtime_dist``: the Python distribution that provides the runtime (profiles record its version).

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
    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]: ...

    def op_profile(self, feeds: Mapping[str, np.ndarray], repeats: int = 20) -> list[OpTiming]:
        """Per-op timings averaged over ``repeats`` runs (empty where the runtime has no counters)."""
        return []

    def close(self) -> None:  # noqa: B027 - optional hook
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

    def is_available(self) -> bool:
        from importlib.util import find_spec

        return all(find_spec(m) is not None for m in self.sdk_modules)

    def require(self) -> None:
        if not self.is_available():
            raise BackendNotInstalledError(self.name, self.sdk_label)

    def check(self, plan: Plan, analysis: ModelAnalysis) -> list[str]:
        """Reasons this backend cannot build ``plan`` for ``analysis`` (empty: it can)."""
        from . import get

        reasons = []
        if plan.backend != self.name:
            reasons.append(f"the plan is for backend {plan.backend}, not {self.name}")
        option = _option_for(plan)
        reasons += get(self.name).check_ops(analysis, option)
        return reasons

    @abstractmethod
    def convert(self, model: onnx.ModelProto, plan: Plan, out_dir: Path,
                calib: CalibrationData | None = None) -> Artifact: ...

    @abstractmethod
    def load(self, artifact: Artifact, artifact_dir: Path, threads: int | None = None) -> Runner: ...

    def artifact_threads(self, artifact: Artifact, artifact_dir: Path) -> int | None:
        """The thread count the artifact records for its runtime (None: none recorded, or not ``threaded``)."""
        return None

    def _no_threads(self, threads: int | None) -> None:
        if threads:
            from . import BACKENDS, get

            threaded = [b for b in BACKENDS if get(b).BACKEND.threaded]
            raise EdgeoptError(f"--threads applies to {', '.join(threaded)} artifacts; {self.name} runs with its own "
                               "setting (leave --threads out)")

    def reference(self, artifact: Artifact, artifact_dir: Path) -> Runner | None:
        """A runner with the artifact's exact numerics that does not depend on this machine's kernels (QDQ graphs run
        as written: quantize, dequantize, float ops), or None where the backend has no such stand-in."""
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
    units that are not CPUs with a known ISA (GPUs, NPUs, MCUs: the backend's own rules apply)."""
    from ..hostinfo import int8_scheme

    unit = plan.target_definition.compute_units[plan.unit]
    return int8_scheme(plan.backend, unit.arch, unit.isa) if unit.arch else None


def int8_numerics(plan: Plan, scheme) -> dict[str, str]:
    """Manifest lines for a plan's int8 layout (empty when no layer is int8)."""
    if not any(lp.precision == "int8" for lp in plan.layers):
        return {}
    if scheme is None:
        return {"int8_scheme": "backend defaults", "int8_reason": f"{plan.target}/{plan.unit} is not a CPU with a known ISA"}
    return {"int8_scheme": f"{scheme.activation_type} activations, {scheme.weight_bits}-bit weights ({scheme.kernel_class})",
            "int8_reason": scheme.reason}


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def tool_versions(*packages: str) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in ("edgeopt", "onnx", "onnxruntime", *packages):
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return out


def make_artifact(out_dir: Path, primary: str, plan: Plan, backend: str, versions: dict[str, str],
                  accuracy: dict[str, float] | None = None, numerics: dict[str, str] | None = None) -> Artifact:
    """Hash every file under ``out_dir`` (but the manifest) into an :class:`Artifact`."""
    files = {str(p.relative_to(out_dir)): sha256_of(p) for p in sorted(out_dir.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    if primary not in files and not (out_dir / primary).is_dir():
        raise EdgeoptError(f"backend {backend} did not write its primary file {primary}")
    size = sum((out_dir / f).stat().st_size for f in files)
    return Artifact(target=plan.target, backend=backend, files=files, primary=primary, size_bytes=size, plan=plan,
                    tool_versions=versions, predicted_latency_ms=plan.predicted_latency_ms, accuracy=accuracy or {},
                    numerics=numerics or {},
                    created_utc=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))


def write_manifest(artifact: Artifact, out_dir: Path) -> Path:
    from ..io import atomic_write_text

    path = out_dir / MANIFEST
    atomic_write_text(path, artifact.model_dump_json(indent=2) + "\n")
    return path


def read_manifest(artifact_dir: Path) -> Artifact:
    from pydantic import ValidationError

    path = Path(artifact_dir) / MANIFEST
    if not path.is_file():
        raise EdgeoptError(f"{artifact_dir} is not an edgeopt artifact (no {MANIFEST})")
    try:
        return Artifact.model_validate_json(path.read_text())
    except ValidationError as e:
        raise EdgeoptError(f"{path} is not a valid manifest: {e.errors()[0]['msg']}") from e


def verify_files(artifact: Artifact, artifact_dir: Path) -> list[str]:
    """Files whose hash no longer matches the manifest (missing ones included)."""
    bad = []
    for rel, digest in artifact.files.items():
        p = Path(artifact_dir) / rel
        if not p.is_file() or sha256_of(p) != digest:
            bad.append(rel)
    return bad


def build_artifact(model: onnx.ModelProto, plan: Plan, out_dir: Path, calib: CalibrationData | None = None) -> Artifact:
    """Convert ``model`` with the plan's backend into ``out_dir`` atomically (all or nothing), manifest included."""
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
    """An artifact's manifest, after checking that its files still have the hashes it records."""
    artifact = read_manifest(artifact_dir)
    bad = verify_files(artifact, artifact_dir)
    if bad:
        raise EdgeoptError(f"artifact {artifact_dir} is damaged: {', '.join(bad)} missing or changed since it was built")
    return artifact


def open_reference(artifact_dir: Path) -> Runner | None:
    """The backend's exact-numerics stand-in for an artifact (see :meth:`Backend.reference`), or None."""
    from . import get

    artifact = read_verified(artifact_dir)
    return get(artifact.backend).BACKEND.reference(artifact, Path(artifact_dir))


def open_artifact(artifact_dir: Path) -> tuple[Artifact, Runner]:
    """Read an artifact's manifest, check its files' hashes, and load it in its backend's runtime."""
    from . import get

    artifact = read_verified(artifact_dir)
    return artifact, get(artifact.backend).BACKEND.load(artifact, Path(artifact_dir))
