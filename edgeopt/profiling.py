"""Measuring latency: of ONNX models in onnxruntime on this machine, and of built artifacts on devices.

Artifact profiles (:func:`edgeopt.remote.profile_artifact`) are saved under ``profiles/`` and
calibrate the cost model's latency predictions (:func:`calibrate`).
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import EdgeoptError
from .types import Profile


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    a = np.asarray(samples_ms, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
            "mean": float(a.mean()), "min": float(a.min())}


def time_runs(call, *, warmup: int = 0, repeats: int = 1, min_seconds: float = 0.0) -> list[float]:
    """Wall time in ms of each of ``repeats`` calls (more until ``min_seconds`` have passed), after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        call()
        times.append((time.perf_counter() - t) * 1e3)
    return times


def ort_latency(model, feed: dict[str, np.ndarray], *, threads: int = 1, warmup: int = 10, repeats: int = 50,
                min_seconds: float = 0.0) -> dict[str, float]:
    """Latency in ms of one ``session.run`` on ``feed`` (a proto, a path or an existing session).

    ``threads`` fixes intra-op threads (one inter-op thread) so runs compare like with like.
    """
    from .fidelity import session

    sess = model if hasattr(model, "run") else session(model, threads=threads)
    return percentiles(time_runs(lambda: sess.run(None, feed), warmup=warmup, repeats=repeats, min_seconds=min_seconds))


def interleaved_latency(models: dict[str, object], feed: dict[str, np.ndarray], *, threads: int = 1, rounds: int = 5,
                        repeats: int = 20, warmup: int = 10) -> dict[str, dict[str, float]]:
    """Latency of several models measured in alternating rounds, so machine noise hits all alike."""
    from .fidelity import session

    sessions = {k: session(m, threads=threads) for k, m in models.items()}
    for s in sessions.values():
        time_runs(lambda s=s: s.run(None, feed), warmup=warmup, repeats=0)
    samples: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            samples[k] += time_runs(lambda s=s: s.run(None, feed), repeats=repeats)
    return {k: percentiles(v) for k, v in samples.items()}


# --------------------------------------------------------------------------- profiling built artifacts
#
# ``edgeopt profile``: load an artifact in its runtime, warm it up, time ``repeats``
# runs with a fixed thread count, record percentiles, the process's peak memory and
# the runtime's per-op table, and save the result as a :class:`~edgeopt.types.Profile`
# under ``profiles/<target>/``.  Saved profiles calibrate the cost model's latency
# predictions per (target, backend, compute unit): see :func:`calibrate`.

PROFILES_DIR = "profiles"
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_info(backend: str | None = None, unit: str | None = None) -> dict[str, str]:
    """Where a profile was measured: machine, OS, CPU, Python, edgeopt and the runtime's version.

    ``unit`` (the compute unit the artifact's plan runs on) is recorded here too, so
    calibration can key profiles by (target, backend, unit).
    """
    from importlib import metadata

    from . import __version__

    info = {"hostname": platform.node(), "system": f"{platform.system()} {platform.release()}",
            "machine": platform.machine(), "cpu": _cpu_model(), "cpus": str(usable_cpus()),
            "python": platform.python_version(), "edgeopt": __version__}
    from .backends import BACKENDS, get

    dist = get(backend).BACKEND.runtime_dist if backend in BACKENDS else None
    if dist:
        try:
            info["runtime"] = f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            pass
    if unit:
        info["unit"] = unit
    return info


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (Linux), in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _maxrss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


def _release_freed_memory() -> None:
    """Hand memory the process freed back to the OS (glibc ``malloc_trim``), so that what the block
    allocates shows as resident growth instead of silently reusing pages freed earlier (a warm process
    that ran other models before could otherwise read 0)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass


class PeakMemory:
    """How much this process's resident memory grew, at its peak, inside the ``with`` block.

    On Linux the kernel's high-water mark (VmHWM) is reset on entry by writing 5 to
    /proc/self/clear_refs, and the result is the peak RSS inside the block minus the RSS
    on entry: the model's weights, the runtime's arenas and caches, inputs and outputs,
    and runtime code paged in for the first time (its module is imported before).
    Elsewhere it falls back to the growth of ``getrusage``'s ru_maxrss, which misses a
    block that stays below an earlier peak of the process (it then reads 0).
    ``method`` says which was used; ``bytes`` is None where neither is available.
    """

    def __init__(self) -> None:
        self.bytes: int | None = None
        self.method = "none"

    def __enter__(self) -> PeakMemory:
        import gc

        gc.collect()
        _release_freed_memory()
        self._hwm = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._hwm = _status_kib("VmHWM") is not None
        except OSError:
            pass
        self._base = _status_kib("VmRSS") if self._hwm else _maxrss_bytes()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._base is None:
            return
        if self._hwm:
            peak, self.method = _status_kib("VmHWM"), "vmhwm"
        else:
            peak, self.method = _maxrss_bytes(), "maxrss"
        if peak is not None:
            self.bytes = max(0, peak - self._base)


_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
               "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16", "tensor(int32)": "int32",
               "tensor(int64)": "int64", "tensor(bool)": "bool", "tensor(bfloat16)": "float32"}


def _input_dtypes(runner) -> dict[str, str]:
    sess = getattr(runner, "session", None)
    if sess is not None and hasattr(sess, "get_inputs"):
        return {i.name: _ORT_DTYPES.get(i.type, "float32") for i in sess.get_inputs()}
    return {}


def make_feeds(artifact, runner, inputs=None, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for one run: ``inputs`` (a mapping, or a .npz/.npy path: one sample in the model's exact input shapes,
    as ``build --inputs`` takes) checked against the model, else random data in the shapes of the artifact's plan
    (uniform [0, 1) floats, zeros/ones for integer and bool inputs: give ``inputs`` for a model whose integer input
    selects a mode)."""
    names = list(runner.input_names)
    if inputs is not None:
        if isinstance(inputs, (str, os.PathLike)):
            from .calibration import load_array_file  # size-checked before allocating, no pickles, one-line errors

            p = Path(inputs)
            if not p.is_file():
                raise EdgeoptError(f"inputs {p} does not exist")
            loaded = load_array_file(p)
            if isinstance(loaded, dict):
                inputs = loaded
            elif len(names) == 1:
                inputs = {names[0]: loaded}
            else:
                raise EdgeoptError(f"the model takes {len(names)} inputs {names}: give them as an .npz")
        missing = [n for n in names if n not in inputs]
        if missing:
            raise EdgeoptError(f"inputs lack {missing}; the model takes {names}")
        feeds = {n: np.asarray(inputs[n]) for n in names}
        shapes = getattr(getattr(artifact, "plan", None), "input_shapes", None) or {}
        for n, a in feeds.items():
            if a.dtype.kind not in "biuf":
                raise EdgeoptError(f"input '{n}' has dtype {a.dtype}; give numbers")
            if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
                raise EdgeoptError(f"input '{n}' holds NaN/Inf; give finite values")
            want = shapes.get(n)
            if want is None:
                continue
            if a.ndim == len(want) - 1 and len(names) == 1 and want[0] in (1, -1):  # one sample without its batch of 1
                a = feeds[n] = a[None]
            if a.ndim != len(want) or any(d > 0 and d != s for d, s in zip(want, a.shape)):
                raise EdgeoptError(f"input '{n}' has shape {list(a.shape)}, the artifact takes {want} (-1: any); give "
                                   "one run's inputs in exactly the model's input shapes (a scalar input as a 0-d array)")
        return feeds
    rng = np.random.default_rng(seed)
    dtypes = _input_dtypes(runner)
    feeds = {}
    for n in names:
        if n not in artifact.plan.input_shapes:
            raise EdgeoptError(f"the artifact's plan has no shape for input '{n}'; give --inputs")
        shape = [d if d > 0 else 1 for d in artifact.plan.input_shapes[n]]
        dt = np.dtype(dtypes.get(n, "float32"))
        if dt.kind == "f":
            feeds[n] = rng.random(shape, dtype=np.float32).astype(dt)
        elif dt.kind == "b":
            feeds[n] = np.zeros(shape, dt)
        else:
            feeds[n] = rng.integers(0, 2, shape).astype(dt)
    return feeds


def _load_runner(artifact, artifact_dir: Path, threads: int | None):
    """The artifact's runner with ``threads`` intra-op threads (default: the artifact's own setting, else every
    usable CPU), and the thread count it runs with (0: the runtime's own choice)."""
    from .backends import get

    backend = get(artifact.backend).BACKEND
    d = Path(artifact_dir)
    if not backend.threaded:
        return backend.load(artifact, d, threads=threads), backend.default_threads
    backend.require()
    # the artifact's own setting is the device's core count: never more threads than this machine has
    n = int(threads or min(backend.artifact_threads(artifact, d) or usable_cpus(), usable_cpus()))
    return backend.load(artifact, d, threads=n), n


def _check_counts(threads: int | None, warmup: int, repeats: int) -> None:
    if threads is not None and threads < 1:
        raise EdgeoptError(f"threads must be at least 1 (got {threads})")
    if warmup < 0:
        raise EdgeoptError(f"warmup must be 0 or more (got {warmup})")
    if repeats < 1:
        raise EdgeoptError(f"repeats must be at least 1 (got {repeats})")


def _now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def profile_local(artifact_dir: str | Path, *, threads: int | None = None, warmup: int = 10, repeats: int = 100,
                  inputs=None, op_repeats: int = 20) -> Profile:
    """Profile an artifact in its runtime on this machine (see :func:`edgeopt.remote.profile_artifact`)."""
    import importlib

    from .backends import get
    from .backends.base import MANIFEST, read_verified, sha256_of
    from .hostinfo import host_stands_for

    _check_counts(threads, warmup, repeats)
    artifact_dir = Path(artifact_dir)
    artifact = read_verified(artifact_dir)
    backend = get(artifact.backend).BACKEND
    if backend.is_available():  # runtime code is not the model's memory: import it before measuring
        for m in backend.sdk_modules:
            importlib.import_module(m)
    with PeakMemory() as mem:
        runner, n_threads = _load_runner(artifact, artifact_dir, threads)
        feeds = make_feeds(artifact, runner, inputs)
        times = time_runs(lambda: runner.run(feeds), warmup=warmup, repeats=repeats)
    try:
        ops = runner.op_profile(feeds, repeats=max(1, min(op_repeats, repeats))) if op_repeats > 0 else []
    finally:
        runner.close()
    return Profile(artifact_sha256=sha256_of(artifact_dir / MANIFEST), target=artifact.target, backend=artifact.backend, unit=artifact.plan.unit,
                   device="local", host=host_info(artifact.backend, artifact.plan.unit), threads=n_threads,
                   warmup=warmup, repeats=repeats, latency_ms=percentiles(times), peak_memory_bytes=mem.bytes,
                   ops=list(ops), predicted_latency_ms=artifact.predicted_latency_ms,
                   on_target_class=host_stands_for(artifact.plan.target_definition, artifact.plan.unit),
                   created_utc=_now_utc())


# --------------------------------------------------------------------------- saving and loading


def device_slug(device: str) -> str:
    """A file-name-safe form of a device string (``ssh://pi@rpi:22`` -> ``ssh-pi-rpi-22``)."""
    return re.sub(r"[^A-Za-z0-9._]+", "-", device).strip("-.") or "device"


def profile_filename(profile: Profile) -> str:
    ts = _dt.datetime.fromisoformat(profile.created_utc).astimezone(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{profile.backend}-{profile.artifact_sha256[:12]}-{device_slug(profile.device)}-{ts}.json"


def save_profile(profile: Profile, profiles_dir: str | Path = PROFILES_DIR) -> Path:
    """Write ``profiles_dir/<target>/<backend>-<sha12>-<device>-<UTC time>.json`` atomically; returns the path."""
    from .io import atomic_write_text

    for what, value in (("target", profile.target), ("backend", profile.backend)):
        if not _NAME.fullmatch(value):
            raise EdgeoptError(f"profile has an invalid {what} name '{value}'")
    if not re.fullmatch(r"[0-9a-f]{12,}", profile.artifact_sha256):
        raise EdgeoptError(f"profile has an invalid artifact hash '{profile.artifact_sha256}'")
    folder = Path(profiles_dir) / profile.target
    name = profile_filename(profile)
    path, n = folder / name, 1
    while path.exists():
        path, n = folder / f"{name[:-5]}-{n}.json", n + 1
    atomic_write_text(path, profile.model_dump_json(indent=2) + "\n")
    return path


def load_profiles(profiles_dir: str | Path = PROFILES_DIR, target: str | None = None) -> list[Profile]:
    """Saved profiles (of one target, or all), oldest first; files that are not valid profiles are skipped."""
    from pydantic import ValidationError

    root = Path(profiles_dir)
    pattern = f"{target}/*.json" if target else "*/*.json"
    out = []
    for p in sorted(root.glob(pattern)) if root.is_dir() else []:
        try:
            out.append(Profile.model_validate_json(p.read_text()))
        except (ValidationError, OSError, UnicodeDecodeError):
            continue
    return sorted(out, key=lambda p: p.created_utc)


# --------------------------------------------------------------------------- calibrating the latency predictor


@dataclass(frozen=True)
class Calibration:
    """measured / predicted latency for one (target, backend, unit): the geometric mean over its profiles."""

    target: str
    backend: str
    unit: str
    factor: float
    profiles: int
    spread: float = 1.0  # geometric standard deviation of the per-profile ratios (1: they all agree)

    def apply(self, predicted_ms: float) -> float:
        return predicted_ms * self.factor


def profile_unit(profile: Profile) -> str:
    """The compute unit a profile ran on (recorded in its host record; ``?`` for profiles without one)."""
    return profile.unit or profile.host.get("unit") or "?"


def measured_ms(profile: Profile) -> float | None:
    """The statistic calibration compares with predictions: the median (the mean where only that was reported)."""
    lat = profile.latency_ms
    v = lat.get("p50", lat.get("mean"))
    return float(v) if v is not None else None


def stands_for_target(profile: Profile) -> bool:
    """Whether ``profile`` was taken on a machine of its target's class (and may calibrate that target).

    Profiles record it (``on_target_class``); for older ones, a profile taken on a device (ssh, adb, agent) counts,
    one taken locally does not.
    """
    if profile.on_target_class is not None:
        return profile.on_target_class
    return profile.device != "local"


def calibrate(profiles, target_name: str) -> dict[tuple[str, str, str], Calibration]:
    """Scale factors measured/predicted per (target, backend, unit) from ``target_name``'s profiles.

    A factor is the geometric mean, over that key's profiles, of measured median latency
    over the latency the plan predicted; profiles without a prediction are ignored, and so are profiles taken on a
    machine not of the target's class (:func:`stands_for_target`): a host's figure never calibrates a device.
    """
    ratios: dict[tuple[str, str, str], list[float]] = {}
    for p in profiles:
        m = measured_ms(p)
        if not stands_for_target(p):
            continue
        if p.target != target_name or not p.predicted_latency_ms or p.predicted_latency_ms <= 0 or not m or m <= 0:
            continue
        ratios.setdefault((p.target, p.backend, profile_unit(p)), []).append(math.log(m / p.predicted_latency_ms))
    out = {}
    for key, logs in ratios.items():
        mean = sum(logs) / len(logs)
        sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / len(logs))
        out[key] = Calibration(*key, factor=math.exp(mean), profiles=len(logs), spread=math.exp(sd))
    return out


def calibration_for(plan, profiles_dir: str | Path = PROFILES_DIR, *, exclude=()) -> Calibration | None:
    """The calibration that applies to ``plan`` from the profiles saved under ``profiles_dir`` (None: no profiles).

    ``exclude``: artifact hashes or Profile objects to leave out (e.g. the profile being reported).
    """
    skip_sha = {x for x in exclude if isinstance(x, str)}
    skip = [x for x in exclude if isinstance(x, Profile)]
    profiles = [p for p in load_profiles(profiles_dir, plan.target) if p.artifact_sha256 not in skip_sha and p not in skip]
    cals = calibrate(profiles, plan.target)
    return cals.get((plan.target, plan.backend, plan.unit))


def calibrated_latency(plan, profiles_dir: str | Path = PROFILES_DIR) -> float | None:
    """The plan's predicted latency (ms) scaled by its (target, backend, unit) calibration; None without profiles."""
    cal = calibration_for(plan, profiles_dir)
    return cal.apply(plan.predicted_latency_ms) if cal else None


# --------------------------------------------------------------------------- reporting


def _ms(v: float | None) -> str:
    return "-" if v is None else (f"{v:.3f}" if v < 100 else f"{v:.1f}")


def render_profile(profile: Profile, out, *, before: Calibration | None = None, after: Calibration | None = None,
                   top: int = 10) -> None:
    """Rich tables: measured percentiles next to the predicted and calibrated-predicted latency, and the top ops.

    ``before``: the calibration from earlier profiles (gives the calibrated prediction);
    ``after``: the calibration with this profile included.
    """
    from rich.table import Table

    lat = profile.latency_ms
    h = profile.host
    out.print(f"[bold]profile[/] {profile.backend}/{profile_unit(profile)} for target {profile.target} on "
              f"{profile.device} ({h.get('hostname', '?')}, {h.get('cpu', h.get('machine', '?'))}): "
              f"threads {profile.threads or 'runtime default'}, warm-up {profile.warmup}, repeats {profile.repeats}")
    t = Table(title="latency (ms, batch 1)", title_justify="left")
    cols = ["p50", "p90", "p99", "mean", "min", "predicted", "calibrated", "p50/predicted"]
    for c in cols:
        t.add_column(c, justify="right")
    m, pred = measured_ms(profile), profile.predicted_latency_ms
    cal = before.apply(pred) if before and pred else None
    t.add_row(*[_ms(lat.get(k)) for k in cols[:5]], _ms(pred), _ms(cal),
              f"{m / pred:.2f}x" if m and pred else "-")
    out.print(t)
    if pred:
        if before:
            out.print(f"calibrated = predicted x {before.factor:.3f} from {before.profiles} earlier profile(s) of "
                      f"{before.backend}/{before.unit}" + (f"; measured p50 / calibrated = {m / cal:.2f}x" if m else ""))
        else:
            out.print("calibrated: no earlier profile of this target/backend/unit")
        if not stands_for_target(profile):
            out.print(f"[yellow]this machine is not of {profile.target}'s class[/]: a figure of this host, not of the "
                      f"device; it does not calibrate {profile.target}'s predictions")
        elif after:
            out.print(f"calibration now: measured/predicted = {after.factor:.3f} over {after.profiles} profile(s) "
                      f"(spread x{after.spread:.2f})")
    if profile.peak_memory_bytes is not None:
        out.print(f"peak memory: {profile.peak_memory_bytes / 2**20:.1f} MiB (resident-set growth at its peak over load + runs)")
    if profile.ops:
        ot = Table(title=f"top {min(top, len(profile.ops))} of {len(profile.ops)} ops by time", title_justify="left")
        for c, j in (("op", "left"), ("type", "left"), ("mean us", "right"), ("share", "right")):
            ot.add_column(c, justify=j)
        for o in sorted(profile.ops, key=lambda o: -o.mean_us)[:top]:
            ot.add_row(o.name, o.op_type, f"{o.mean_us:.1f}", f"{o.share:.1%}")
        out.print(ot)
    else:
        out.print("per-op times: not reported by this runtime")
