"""The CPU edgeopt runs on, the ISA features that change which kernels run, and what they imply.

Detection uses archspec (Spack's CPU library: ``/proc/cpuinfo`` on Linux, ``sysctl`` on
macOS, CPUID on Windows) for the raw feature flags and the microarchitecture name.
Feature names are normalised to one vocabulary per architecture (:data:`FEATURES`), the
one target files use in ``compute_units.<unit>.isa``.

What the features imply for int8 (:func:`int8_scheme`) is the reason this module exists:
on x86 without VNNI, onnxruntime's u8s8/s8s8 kernels multiply with ``vpmaddubsw``, whose
pairwise sums of u8 x s8 products saturate at int16: two products of 255 x 127 overflow.
Weights kept in 7 bits ([-64, 64]: ``reduce_range``) make every pair fit (2 x 255 x 64 =
32640 <= 32767), so the kernels are exact.  VNNI (``vpdpbusd``), AMX and Arm's
``sdot``/``smmla`` accumulate in int32 and need no such restriction.

Pure: no onnx, no vendor SDK.  ``EDGEOPT_HOST_ISA`` overrides detection (``x86_64:avx2,fma``),
for emulators such as qemu-user, which run the guest CPU's kernels but show the host's
``/proc/cpuinfo``.
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Arch = Literal["x86_64", "arm64"]

#: The features edgeopt reads, per architecture, with what each one changes.
FEATURES: dict[str, dict[str, str]] = {
    "x86_64": {
        "sse4_2": "SSE4.2 baseline",
        "avx": "256-bit float vectors",
        "avx2": "256-bit integer vectors (int8 via vpmaddubsw: int16 pair sums saturate)",
        "fma": "fused multiply-add for fp32",
        "f16c": "fp16 <-> fp32 conversion (storage only)",
        "avx512f": "512-bit vectors",
        "avx512bw": "512-bit byte/word integer ops",
        "avx512_vnni": "vpdpbusd: u8 x s8 dot products accumulated in int32 (exact, fast int8)",
        "avx_vnni": "VNNI on 256-bit vectors (Alder Lake and later client cores)",
        "avx512_bf16": "vdpbf16ps: native bf16 dot products",
        "avx512_fp16": "native fp16 arithmetic",
        "amx_tile": "AMX tile registers",
        "amx_int8": "AMX int8 tile multiply (int32 accumulation)",
        "amx_bf16": "AMX bf16 tile multiply",
    },
    "arm64": {
        "neon": "128-bit SIMD (ASIMD)",
        "fp16": "native fp16 arithmetic (ASIMDHP)",
        "dotprod": "sdot/udot: int8 dot products accumulated in int32",
        "i8mm": "smmla/usmmla: int8 matrix multiply-accumulate (2x the dotprod rate)",
        "bf16": "native bf16 dot products (bfdot/bfmmla)",
        "sve": "scalable vectors",
        "sve2": "scalable vectors, second version",
        "sme": "scalable matrix extension",
    },
}

#: Other spellings (Linux /proc/cpuinfo, macOS sysctl) -> the names above.
_ALIASES = {
    "asimd": "neon", "asimdhp": "fp16", "fphp": "fp16", "asimddp": "dotprod", "avx512vnni": "avx512_vnni",
    "avxvnni": "avx_vnni", "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16", "sse4.2": "sse4_2",
    "feat_dotprod": "dotprod", "feat_i8mm": "i8mm", "feat_fp16": "fp16", "feat_bf16": "bf16", "feat_sme": "sme",
    "feat_sve": "sve", "feat_sve2": "sve2",
}


def normalise_arch(machine: str) -> str:
    m = machine.lower()
    return {"amd64": "x86_64", "x64": "x86_64", "aarch64": "arm64", "armv8": "arm64"}.get(m, m)


def normalise_features(arch: str, raw: set[str] | list[str]) -> list[str]:
    """The known features among ``raw`` (any spelling), sorted; arm64 always has NEON."""
    known = FEATURES.get(arch, {})
    out = {_ALIASES.get(f.lower(), f.lower()) for f in raw}
    if arch == "arm64":
        out.add("neon")
    return sorted(out & set(known))


class HostCpu(BaseModel):
    """What :func:`detect` found."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    arch: str
    vendor: str
    model_name: str
    microarchitecture: str = Field(description="archspec's name for the closest known microarchitecture")
    features: list[str] = Field(description="kernel-relevant ISA features, in edgeopt's vocabulary")
    cores: int = Field(description="CPUs this process may use")
    ram_bytes: int = Field(description="physical memory, or the container's limit when lower")
    source: str = Field(description="where the features came from")

    @property
    def kernel_class(self) -> str:
        return kernel_class(self.arch, self.features)


def _ram_bytes() -> int:
    total = 0
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(limit_file).read().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < (total or 1 << 62):
            total = int(text)
    return total


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@lru_cache(maxsize=1)
def detect() -> HostCpu:
    """This machine's CPU (cached for the process)."""
    arch = normalise_arch(platform.machine())
    override = os.environ.get("EDGEOPT_HOST_ISA", "").strip()
    vendor, model_name, uarch, source = "unknown", platform.processor() or "", "unknown", "archspec"
    if override:
        o_arch, _, feats = override.rpartition(":")
        arch = normalise_arch(o_arch) if o_arch else arch
        raw = {f.strip() for f in feats.split(",") if f.strip()}
        source = "EDGEOPT_HOST_ISA"
    else:
        raw = set()
        try:
            import warnings

            import archspec.cpu
            import archspec.cpu.detect as det

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                info = det.detected_info()
                host = archspec.cpu.host()
            raw = set(info.features)
            vendor, uarch = str(info.vendor), str(host.name)
            model_name = det.brand_string() or model_name
        except Exception as e:  # archspec missing or failing on an exotic OS: report a generic CPU
            source = f"none ({type(e).__name__}: {e})"
    return HostCpu(arch=arch, vendor=vendor, model_name=model_name or "unknown", microarchitecture=uarch,
                   features=normalise_features(arch, raw), cores=_cores(), ram_bytes=_ram_bytes(), source=source)


# --------------------------------------------------------------------------- what features imply


def kernel_class(arch: str, features: list[str] | set[str]) -> str:
    """The class of int8/float kernels a CPU runs (what decides numerics and relative speed)."""
    f = set(features)
    if arch == "x86_64":
        for cls, need in (("amx", "amx_int8"), ("avx512-vnni", "avx512_vnni"), ("avx-vnni", "avx_vnni"),
                          ("avx512", "avx512f"), ("avx2", "avx2")):
            if need in f:
                return cls
        return "sse"
    if arch == "arm64":
        return "i8mm" if "i8mm" in f else "dotprod" if "dotprod" in f else "neon"
    return arch or "unknown"


def int8_accumulates_exactly(arch: str, features: list[str] | set[str]) -> bool:
    """Whether full-range int8 products accumulate without intermediate saturation."""
    return arch != "x86_64" or kernel_class(arch, features) in ("amx", "avx512-vnni", "avx-vnni")


def bf16_native(arch: str, features: list[str] | set[str]) -> bool:
    f = set(features)
    return bool(f & {"avx512_bf16", "amx_bf16"}) if arch == "x86_64" else "bf16" in f


def fp16_native(arch: str, features: list[str] | set[str]) -> bool:
    f = set(features)
    return "avx512_fp16" in f if arch == "x86_64" else "fp16" in f


class Int8Scheme(BaseModel):
    """How int8 is laid out for one backend on one CPU class, and why."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: str
    kernel_class: str
    activation_type: Literal["uint8", "int8"]
    weight_bits: Literal[7, 8] = Field(description="7: weights in [-64, 64] (reduce_range / nncf overflow fix)")
    reason: str


def int8_scheme(backend: str, arch: str, features: list[str] | set[str]) -> Int8Scheme:
    """The int8 layout ``backend`` runs exactly and fast on a CPU with ``features``."""
    cls = kernel_class(arch, features)
    exact = int8_accumulates_exactly(arch, features)
    if arch == "x86_64":
        if exact:
            why = (f"{cls}: u8 x s8 products accumulate in int32 ({'AMX tiles' if cls == 'amx' else 'vpdpbusd'}), so "
                   "full-range int8 weights are exact; uint8 activations run onnxruntime's U8S8 kernels")
            return Int8Scheme(backend=backend, kernel_class=cls, activation_type="uint8", weight_bits=8, reason=why)
        why = (f"{cls} has no VNNI: int8 kernels multiply with (v)pmaddubsw, whose int16 pair sums saturate "
               "with full-range weights; 7-bit weights ([-64, 64]) keep every pair in range, so the kernels are exact")
        return Int8Scheme(backend=backend, kernel_class=cls, activation_type="uint8", weight_bits=7, reason=why)
    if arch == "arm64":
        how = {"i8mm": "smmla", "dotprod": "sdot"}.get(cls, "widening multiplies (smull/sadalp)")
        why = f"{cls}: {how} accumulates int8 products in int32, exact with full-range weights; signed activations"
        return Int8Scheme(backend=backend, kernel_class=cls, activation_type="int8", weight_bits=8, reason=why)
    return Int8Scheme(backend=backend, kernel_class=cls, activation_type="uint8", weight_bits=8,
                      reason=f"{arch}: no ISA rule known; onnxruntime's defaults")


def implications(cpu: HostCpu) -> list[tuple[str, str]]:
    """(topic, what it means) lines for ``edgeopt targets detect``."""
    out = [("kernel class", cpu.kernel_class)]
    s = int8_scheme("onnxruntime", cpu.arch, cpu.features)
    out.append(("int8 exact at full range", "yes" if s.weight_bits == 8 else "no (int16 saturation)"))
    out.append(("int8 scheme", f"{s.activation_type} activations, {s.weight_bits}-bit weights: {s.reason}"))
    bf = bf16_native(cpu.arch, cpu.features)
    out.append(("bf16", "native" if bf else "emulated (slower than fp32): not planned on this CPU"))
    fp = fp16_native(cpu.arch, cpu.features)
    out.append(("fp16", "native arithmetic" if fp else "storage only (computed in fp32)"))
    return out


def runs_like_host(arch: str | None, features: list[str] | set[str]) -> bool:
    """Whether a CPU with ``features`` runs the same kernel class as this host (so this host's kernels, numerics
    and latency stand for it)."""
    cpu = detect()
    return arch is not None and arch == cpu.arch and kernel_class(arch, features) == cpu.kernel_class


def host_stands_for(target, unit: str | None = None) -> bool:
    """Whether a measurement taken on this host stands for ``target`` (its ``unit``, else any of its units): the only
    measurements that may calibrate the target's latency predictions.

    * a CPU unit (it declares ``arch``): this host's CPU has the same architecture and kernel class
      (:func:`runs_like_host`);
    * an accelerator unit (GPU, NPU, DLA, ANE): its runtime ran here, so this host has one; it stands for a
      ``server-gpu`` target, and for an ``edge-gpu`` one on an arm64 host (Jetson modules are); never for phones
      and microcontrollers, whose accelerators a workstation does not have.

    Args:
        target: the target (:class:`edgeopt.types.Target`; e.g. a plan's ``target_definition``).
        unit: one of its compute units' names; None: any.
    """
    units = [target.compute_units[unit]] if unit in target.compute_units else list(target.compute_units.values())
    for u in units:
        if u.arch is not None:
            if runs_like_host(u.arch, u.isa):
                return True
        elif target.device_class == "server-gpu" or (target.device_class == "edge-gpu" and detect().arch == "arm64"):
            return True
    return False
