"""The ``host`` target: this machine, with a compute model from a cached micro-benchmark.

No test here asserts a time: the numbers depend on the machine (AVX2-only, AVX-512 VNNI,
AMX...) and on what else runs on it.  The real benchmark runs once (in a temporary
cache); the other tests use a fixed benchmark record.
"""

from __future__ import annotations

import importlib.util

import pytest

from edgeopt import hostinfo, microbench
from edgeopt.datasets import default_model_path
from edgeopt.errors import UnknownTargetError
from edgeopt.targets import builtin_names, load_target, load_targets, target_sha256
from edgeopt.types import Target

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None


def fake_bench(threads: int = 2, bf16: bool = True) -> dict:
    rates = {"conv": 2.0e11, "pointwise": 1.5e11, "depthwise": 2.0e10, "gemm": 1.8e11}
    ov = {"fp32": 1.6e11, **({"bf16": 3.0e11} if bf16 else {})}
    return {"schema": microbench.SCHEMA, "key": "fake", "threads": threads,
            "rates_ops_per_s": {"fp32": rates, "int8": {k: 2 * v for k, v in rates.items()}},
            "openvino_conv_ops_per_s": ov, "memory_bandwidth_bytes_per_s": 2.0e10, "layer_overhead_us": 1.5,
            "run_overhead_us": 4.0, "wint8_overhead_us": 3.0, "wint4_overhead_us": 5.0,
            "kernel_models": {f"{p}:{k}": {"fixed_us": 2.0, "us_per_mmac": 5.0 if p == "fp32" else 2.0, "us_per_mb": 20.0,
                                           "samples": 6, "max_rel_error": 0.1}
                              for p in ("fp32", "int8") for k in microbench.GRID}}


@pytest.fixture(autouse=True)
def fresh_state(tmp_path_factory, monkeypatch):
    """Each test: a private cache dir, a fresh CPU detection and no in-process host target."""
    monkeypatch.setenv("EDGEOPT_CACHE", str(tmp_path_factory.mktemp("cache")))
    hostinfo.detect.cache_clear()
    microbench._host_target_cached.cache_clear()
    yield
    monkeypatch.undo()
    hostinfo.detect.cache_clear()
    microbench._host_target_cached.cache_clear()


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory):
    """One real micro-benchmark run for the module (a few seconds)."""
    d = tmp_path_factory.mktemp("hostcache")
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGEOPT_CACHE", str(d))
    hostinfo.detect.cache_clear()
    microbench._host_target_cached.cache_clear()
    data = microbench.load_or_run()
    mp.undo()
    return d, data


def test_host_resolves_validates_and_describes_this_cpu(real_cache, monkeypatch):
    d, data = real_cache
    monkeypatch.setenv("EDGEOPT_CACHE", str(d))
    t = load_target("host")
    cpu = hostinfo.detect()
    assert isinstance(t, Target) and t.name == "host" and t.device_class == "cpu"
    assert Target.model_validate(t.model_dump()) == t
    assert t.family == {"x86_64": "x86-cpu", "arm64": "arm64-cpu"}.get(cpu.arch)
    unit = t.compute_units["cpu"]
    assert unit.isa == cpu.features and unit.arch == (cpu.arch if cpu.arch in ("x86_64", "arm64") else None)
    assert 0 < t.budgets.ram <= max(cpu.ram_bytes, 1 << 28) and t.budgets.storage > 0 and t.budgets.latency_ms > 0
    ort = t.backends[0]
    assert ort.backend == "onnxruntime" and ort.precisions == ["fp32", "int8", "wint8", "wint4"]
    assert ort.options["threads"] == cpu.cores == data["threads"]
    assert ort.options["channel_multiple"] == (16 if "avx512f" in cpu.features else 8)
    assert set(unit.peak_ops_per_s) >= {"fp32", "int8"} and unit.layer_overhead_us >= 0
    assert data["int8_weight_bits"] == hostinfo.int8_scheme("onnxruntime", cpu.arch, cpu.features).weight_bits
    # every kernel kind measured, for fp32 and int8, with a positive rate
    for p in ("fp32", "int8"):
        assert set(data["rates_ops_per_s"][p]) == {"conv", "pointwise", "depthwise", "gemm"}
        assert all(v > 0 for v in data["rates_ops_per_s"][p].values())
    # bf16 is offered exactly where the CPU has it natively (and OpenVINO is there to run it)
    offered = any("bf16" in o.precisions for o in t.backends)
    assert offered == (hostinfo.bf16_native(cpu.arch, cpu.features) and HAS_OPENVINO and cpu.arch == "x86_64")
    assert ("bf16" in unit.peak_ops_per_s) == offered
    assert any(o.backend == "openvino" for o in t.backends) == (HAS_OPENVINO and cpu.arch == "x86_64")


def test_host_is_cached_on_disk(real_cache, monkeypatch):
    d, data = real_cache
    monkeypatch.setenv("EDGEOPT_CACHE", str(d))
    path = microbench.cache_path()
    assert path.is_file() and path.parent == d / "host"
    first = load_target("host")
    microbench._host_target_cached.cache_clear()

    def boom(*a, **k):
        raise AssertionError("the micro-benchmark ran again")

    monkeypatch.setattr(microbench, "run_microbench", boom)
    again = load_target("host")
    assert target_sha256(again) == target_sha256(first)
    assert load_targets("host")[0] == again


def test_cache_key_follows_the_cpu(monkeypatch):
    key = microbench.cache_key()
    monkeypatch.setenv("EDGEOPT_HOST_ISA", "x86_64:sse4_2,avx,avx2,fma")
    hostinfo.detect.cache_clear()
    assert microbench.cache_key() != key
    assert microbench.cache_path().name == f"microbench-{microbench.cache_key()}.json"


def test_a_fresh_cache_runs_the_benchmark_once(monkeypatch):
    calls = []

    def fake(threads=None):
        calls.append(threads)
        return {**fake_bench(), "key": microbench.cache_key()}

    monkeypatch.setattr(microbench, "run_microbench", fake)
    a = load_target("host")
    microbench._host_target_cached.cache_clear()
    b = load_target("host")
    assert a == b and len(calls) == 1


@pytest.mark.parametrize("isa,bf16,multiple", [
    ("x86_64:sse4_2,avx,avx2,fma,f16c", False, 8),                                         # AVX2 only
    ("x86_64:sse4_2,avx,avx2,fma,f16c,avx512f,avx512bw,avx512_vnni", False, 16),          # AVX-512 VNNI
    ("x86_64:sse4_2,avx,avx2,fma,avx512f,avx512bw,avx512_vnni,avx512_bf16,amx_tile,amx_int8,amx_bf16", True, 16),  # AMX
])
def test_host_isa_override(monkeypatch, isa, bf16, multiple):
    monkeypatch.setenv("EDGEOPT_HOST_ISA", isa)
    hostinfo.detect.cache_clear()
    cpu = hostinfo.detect()
    assert cpu.source == "EDGEOPT_HOST_ISA"
    t = microbench.host_target(fake_bench(bf16=True))
    unit = t.compute_units["cpu"]
    assert unit.arch == "x86_64" and unit.isa == cpu.features == sorted(isa.split(":")[1].split(","))
    assert t.family == "x86-cpu"
    assert t.backends[0].options["channel_multiple"] == multiple
    assert any("bf16" in o.precisions for o in t.backends) == bf16
    assert ("bf16" in unit.peak_ops_per_s) == bf16
    assert [o.backend for o in t.backends] == ["onnxruntime", "openvino"]
    assert not any("bf16" in o.precisions for o in microbench.host_target(fake_bench(bf16=False)).backends)


def test_arm64_host_has_no_openvino(monkeypatch):
    monkeypatch.setenv("EDGEOPT_HOST_ISA", "arm64:neon,dotprod,i8mm,bf16")
    hostinfo.detect.cache_clear()
    t = microbench.host_target(fake_bench())
    assert t.family == "arm64-cpu" and t.compute_units["cpu"].arch == "arm64"
    assert [o.backend for o in t.backends] == ["onnxruntime"] and t.backends[0].options["channel_multiple"] == 8


def test_kernel_models_reach_the_cost_model(digits_model):
    from edgeopt.costmodel import kernel_kind, layer_latency
    from edgeopt.graph import analyze

    t = microbench.host_target(fake_bench())
    opt, unit = t.backends[0], t.compute_units["cpu"]
    a = analyze(digits_model)
    convs = [ly for ly in a.layers if ly.op_type == "Conv"]
    gemms = [ly for ly in a.layers if ly.op_type == "Gemm"]
    assert convs and gemms and all(kernel_kind(ly) in ("conv", "pointwise", "depthwise") for ly in convs)
    assert all(kernel_kind(ly) == "gemm" for ly in gemms)
    ly = convs[0]
    km = opt.kernel_models[f"fp32:{kernel_kind(ly)}"]
    act_mb = (ly.input_elems + ly.output_elems) * 4 / 1e6
    expect = km.fixed_us + km.us_per_mmac * ly.macs / 1e6 + km.us_per_mb * (act_mb + ly.weight_bytes / 1e6)
    assert layer_latency(ly, "fp32", opt, unit).ms == pytest.approx(expect / 1e3)
    # int8 has its own measured line; targets without kernel models keep the roofline
    assert layer_latency(ly, "int8", opt, unit).ms < layer_latency(ly, "fp32", opt, unit).ms
    x86 = load_target("x86-cpu")
    assert not x86.backends[0].kernel_models
    roof = layer_latency(ly, "fp32", x86.backends[0], x86.compute_units["cpu"])
    assert roof.bound in ("compute", "memory") and roof.ms > 0


def test_kernel_model_fit_recovers_a_line():
    samples = [(m, b, 3.0 + 4.0 * m + 10.0 * b) for m, b in ((0.1, 0.2), (1.0, 0.5), (5.0, 3.0), (20.0, 1.0), (0.5, 8.0))]
    fit = microbench.fit_kernel_model(samples)
    assert fit["fixed_us"] == pytest.approx(3.0) and fit["us_per_mmac"] == pytest.approx(4.0)
    assert fit["us_per_mb"] == pytest.approx(10.0) and fit["max_rel_error"] < 1e-9
    # a negative coefficient is dropped, not kept: time never decreases with size
    neg = microbench.fit_kernel_model([(1.0, 1.0, 10.0), (2.0, 4.0, 12.0), (4.0, 1.0, 30.0), (8.0, 2.0, 50.0)])
    assert min(neg["fixed_us"], neg["us_per_mmac"], neg["us_per_mb"]) >= 0


def test_host_is_not_builtin_but_listed_as_valid():
    assert "host" not in builtin_names()
    with pytest.raises(UnknownTargetError) as e:
        load_target("hots")
    msg = str(e.value)
    assert "host" in msg and "x86-cpu" in msg and "\n" not in msg


@pytest.mark.parametrize("isa,qmax", [("x86_64:sse4_2,avx,avx2,fma,f16c", 64), ("x86_64:avx2,avx512f,avx512_vnni", 127)])
def test_host_int8_artifact_follows_the_detected_isa(tmp_path, monkeypatch, digits_data, isa, qmax):
    """--target host on an AVX2-only CPU builds 7-bit int8 weights (exact on its kernels), on a VNNI CPU full range."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from edgeopt.backends.base import build_artifact
    from edgeopt.graph import analyze
    from edgeopt.planner import make_plan

    monkeypatch.setenv("EDGEOPT_HOST_ISA", isa)
    hostinfo.detect.cache_clear()
    m, cal, _ = digits_data
    plan = make_plan(analyze(default_model_path()), microbench.host_target(fake_bench()), backend="onnxruntime",
                     precision="int8")
    art = build_artifact(m, plan, tmp_path / "a", cal)
    q = onnx.load(str(tmp_path / "a" / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    weights = [inits[n.input[0]] for n in q.graph.node
               if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].ndim >= 2]
    assert weights and max(int(np.abs(w.astype(np.int32)).max()) for w in weights) == qmax
    assert art.numerics["int8_scheme"].startswith("uint8 activations, " + ("7" if qmax == 64 else "8") + "-bit weights")


def test_grid_covers_every_kernel_kind_and_keys_are_checked():
    from pydantic import ValidationError

    from edgeopt.types import KERNEL_KINDS, BackendOption

    assert sorted(microbench.GRID) == sorted(KERNEL_KINDS)
    with pytest.raises(ValidationError, match="kernel_models keys"):
        BackendOption(backend="onnxruntime", unit="cpu", precisions=["fp32"],
                      kernel_models={"fp32:convv": {"fixed_us": 1, "us_per_mmac": 1, "us_per_mb": 1}})
