"""The data that moves between edgeopt's stages.

Every model here is frozen and rejects unknown fields, so a typo in a target
file or a hand-edited plan is an error instead of a silently ignored key.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
    TypeAdapter,
    field_validator,
    model_validator,
)

from . import technique

#: A numeric format a layer can run in, and a pruning pattern ("none": dense): names of techniques registered in
#: :mod:`edgeopt.technique` (fp32, fp16, bf16, int8, wint8, wint4; 2:4, unstructured, channel; and any registered
#: later), checked when a model is validated.
Precision = Annotated[str, AfterValidator(technique.check_precision)]
Sparsity = Annotated[str, AfterValidator(technique.check_sparsity)]


def _precision_keys(v: dict[str, float]) -> dict[str, float]:
    """``v`` when every key is a registered precision; ValueError naming the unknown ones and the valid ones."""
    valid = technique.precision_names()
    bad = sorted(set(v) - set(valid))
    if bad:
        raise ValueError(f"unknown precision(s) {bad}; valid: {list(valid)}")
    return v


def _pattern(name: str) -> str:
    if name == "none":
        raise ValueError(f"a sparsity pattern is one of {', '.join(technique.sparsity_names())}")
    return technique.check_sparsity(name)


SparsityPattern = Annotated[str, AfterValidator(_pattern)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --------------------------------------------------------------------------- targets
#
# Every number in a target is checked where it is declared: finite (no NaN/Inf, which would plan "latency nan ms"),
# a number rather than true/false (YAML booleans would otherwise read as 1/0), and within a range that means
# something (rates and sizes positive, efficiencies in (0, 1]), so a target built in Python is held to the same rules
# as a target file.

#: The largest size a budget may state (1 EiB): bigger numbers are typos, and would overflow the cost model's floats.
MAX_SIZE_BYTES = 1 << 60
#: Bounds of a rate (ops/s, bytes/s) and of a time in microseconds or milliseconds a target may state.
MAX_RATE = 1e21
MIN_RATE = 1e3
MAX_TIME = 1e9


def _not_bool(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError("must be a number, not true/false")
    return v


_BYTE_SIZE = TypeAdapter(ByteSize)


def _size(v: Any) -> Any:
    what = "a size: bytes, or a number with a unit like 512KiB or 2MB"
    if isinstance(v, bool):
        raise ValueError(f"must be {what}, not true/false")
    if (isinstance(v, int) and v <= 0) or (isinstance(v, float) and not (math.isfinite(v) and v > 0)):
        raise ValueError(f"must be {what}, more than 0, not {v}")
    if isinstance(v, float) and not v.is_integer():
        raise ValueError(f"must be {what}, a whole number of bytes, not {v}")
    if isinstance(v, str):
        from pydantic import ValidationError

        try:
            return _BYTE_SIZE.validate_python(v)
        except ValidationError:
            raise ValueError(f"must be {what}, not {v[:40]!r}") from None
    return v


def _size_range(v: ByteSize) -> ByteSize:
    if not 0 < v <= MAX_SIZE_BYTES:
        raise ValueError(f"must be between 1 byte and 1EiB, not {str(v)[:40] + ('...' if len(str(v)) > 40 else '')}")
    return v


#: A size in bytes: ``512KiB``, ``2MB`` or an integer, from 1 byte to 1 EiB.
Size = Annotated[ByteSize, BeforeValidator(_size), AfterValidator(_size_range)]
#: A finite float (no true/false) with the given bounds.
Rate = Annotated[float, BeforeValidator(_not_bool), Field(ge=MIN_RATE, le=MAX_RATE, allow_inf_nan=False)]
Time = Annotated[float, BeforeValidator(_not_bool), Field(ge=0, le=MAX_TIME, allow_inf_nan=False)]
Fraction = Annotated[float, BeforeValidator(_not_bool), Field(gt=0, le=1, allow_inf_nan=False)]


def _scalar(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError("must be finite")
    if not isinstance(v, (str, int, float, bool)):
        raise ValueError(f"must be a string, number or true/false, not {type(v).__name__}")
    return v


#: A backend setting's value before the backend's typed settings check it.
OptionValue = Annotated[str | int | float | bool, BeforeValidator(_scalar)]


class _TargetModel(_Frozen):
    """A part of a target: frozen, no unknown keys, no NaN/Inf anywhere."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class Budgets(_TargetModel):
    """What the model may use on the device.  Sizes accept ``512KiB``, ``2MB``, or bytes."""

    ram: Size = Field(description="working memory for activations (+ weights if they must be in RAM)")
    storage: Size = Field(description="room for the model file (flash on an MCU)")
    latency_ms: Annotated[float, BeforeValidator(_not_bool)] = Field(gt=0, le=MAX_TIME, description="one inference, batch 1")
    latency_is_limit: bool = Field(
        default=False,
        description="whether latency_ms is a limit (plans over it are refused) or a goal (the fastest plan that fits "
                    "RAM and storage is built, and a missed goal is said); --max-latency-ms makes it a limit",
    )
    weights_in_ram: bool = Field(
        default=True,
        description="whether weights are loaded into RAM (false on an MCU, where they execute from flash)",
    )


class ComputeUnit(_TargetModel):
    """A roofline model of one compute unit (CPU cluster, GPU, NPU, DSP)."""

    description: str = ""
    peak_ops_per_s: dict[str, Rate] = Field(
        description="peak arithmetic rate per compute precision (1 MAC = 2 ops)"
    )
    memory_bandwidth_bytes_per_s: Rate
    efficiency: Fraction = Field(default=0.5, description="fraction of peak a well-tuned kernel reaches")
    layer_overhead_us: Time = Field(default=0.0, description="fixed cost per layer (dispatch, launch)")
    run_overhead_us: Time = Field(default=0.0, description="fixed cost per inference (session entry, I/O binding)")
    arch: Literal["x86_64", "arm64"] | None = Field(default=None, description="CPU architecture (CPU units only)")
    isa: list[str] = Field(default_factory=list, description="ISA features that change kernels (edgeopt.hostinfo.FEATURES)")

    @model_validator(mode="after")
    def _known_isa(self) -> ComputeUnit:
        from .hostinfo import FEATURES

        if self.isa and self.arch is None:
            raise ValueError("isa needs arch (x86_64 or arm64)")
        bad = sorted(set(self.isa) - set(FEATURES.get(self.arch or "", {})))
        if bad:
            raise ValueError(f"unknown {self.arch} ISA feature(s) {bad}; valid: {sorted(FEATURES[self.arch or 'x86_64'])}")
        return self

    @property
    def kernel_class(self) -> str | None:
        from .hostinfo import kernel_class

        return kernel_class(self.arch, self.isa) if self.arch else None

    @field_validator("peak_ops_per_s")
    @classmethod
    def _known_precisions(cls, v: dict[str, float]) -> dict[str, float]:
        _precision_keys(v)
        if any(x <= 0 for x in v.values()):
            raise ValueError("peak rates must be positive")
        return v


class SparsitySupport(_TargetModel):
    pattern: SparsityPattern
    speedup: Annotated[float, BeforeValidator(_not_bool)] = Field(
        default=1.0, ge=1.0, le=1000.0, description="compute speed-up on layers using it")
    precisions: list[Precision] | None = Field(default=None, description="None: all the backend's precisions")
    compresses_storage: bool = Field(default=False, description="whether the format stores it compactly")


#: Kernel kinds a backend option may time separately (``BackendOption.kernel_models``; see
#: :func:`edgeopt.costmodel.kernel_kind`).
KERNEL_KINDS: tuple[str, ...] = ("conv", "pointwise", "depthwise", "gemm", "convtranspose", "resize", "elementwise")


class KernelModel(_TargetModel):
    """Measured time of one kernel kind at one precision on one backend (a line fitted to synthetic layers):
    ``fixed_us + us_per_mmac * MMACs + us_per_mb * MB moved``; the fixed part includes the per-node dispatch."""

    fixed_us: Time
    us_per_mmac: Time
    us_per_mb: Time
    samples: Annotated[int, BeforeValidator(_not_bool)] = Field(
        default=0, ge=0, le=10**9, description="synthetic layers it was fitted to")
    max_rel_error: Time | None = Field(default=None, description="worst relative error of the fit on them")


#: A count in a backend's settings (no true/false).
Count = Annotated[int, BeforeValidator(_not_bool)]


class _BackendSettings(_TargetModel):
    threads: Count | None = Field(default=None, ge=1, le=4096, description="intra-op threads the runtime uses")


class OnnxRuntimeSettings(_BackendSettings):
    provider: Literal["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider",
                      "OpenVINOExecutionProvider", "CoreMLExecutionProvider", "DmlExecutionProvider",
                      "QNNExecutionProvider", "XnnpackExecutionProvider"] = "CPUExecutionProvider"
    channel_multiple: Count | None = Field(default=None, ge=1, le=65536,
                                           description="channel counts its fast kernels want (pruning)")


class OpenVinoSettings(_BackendSettings):
    device: str = Field(default="CPU", description="OpenVINO device: CPU, GPU, NPU, AUTO, ...")


class TfliteSettings(_BackendSettings):
    delegate: Literal["xnnpack", "nnapi", "gpu", "hexagon", "none"] = "xnnpack"
    calibration_samples: Count = Field(default=256, ge=1, le=10**7)


class TflmSettings(_BackendSettings):
    kernels: Literal["reference", "cmsis-nn", "ethos-u"] = "reference"
    calibration_samples: Count = Field(default=256, ge=1, le=10**7)


class CoreMlSettings(_BackendSettings):
    compute_units: Literal["ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE"] = "ALL"


class TensorRtSettings(_BackendSettings):
    device: Literal["gpu", "dla"] = "gpu"
    dla_core: Count | None = Field(default=None, ge=0, le=64)
    gpu_fallback: bool = False


#: The backends and the settings each takes in a target's ``backends[].options`` (an unknown key is an error): the one
#: list of backend names (``edgeopt.backends.BACKENDS`` is its keys).
BACKEND_SETTINGS: dict[str, type[_BackendSettings]] = {
    "onnxruntime": OnnxRuntimeSettings, "openvino": OpenVinoSettings, "tflite": TfliteSettings, "tflm": TflmSettings,
    "coreml": CoreMlSettings, "tensorrt": TensorRtSettings,
}


class BackendOption(_TargetModel):
    """One way to run models on a target: a backend on one compute unit."""

    backend: str = Field(description="a backend: a key of BACKEND_SETTINGS, a module of edgeopt.backends")
    unit: str = Field(description="key into the target's compute units")
    options: dict[str, OptionValue] = Field(
        default_factory=dict, description="backend settings (delegate, execution provider, precision hint...)"
    )
    precisions: list[Precision]
    sparsity: list[SparsitySupport] = Field(default_factory=list)
    requires_full_integer: bool = Field(
        default=False, description="every layer must be int8 (TFLM, NNAPI/EdgeTPU style accelerators)"
    )
    requires_static_shapes: bool = False
    efficiency: Fraction | None = Field(default=None, description="overrides the unit's efficiency")
    efficiency_by_precision: dict[str, Fraction] = Field(
        default_factory=dict, description="efficiency per precision where kernels differ in quality (measured)"
    )
    overhead_us_by_precision: dict[str, Time] = Field(
        default_factory=dict, description="extra fixed cost per layer per precision (dequantization, repacking)"
    )
    kernel_models: dict[str, KernelModel] = Field(
        default_factory=dict, description="'<precision>:<kind>' (kinds: edgeopt.costmodel.KERNEL_KINDS) -> measured "
                                          "kernel time; replaces the roofline for those layers (the host target has them)")
    fuses: list[str] | None = Field(
        default=None, description="elementwise ops the runtime folds into a preceding conv/matmul "
                                  "(None: edgeopt.costmodel.FUSABLE, what most runtimes fuse)")
    nchwc: bool = Field(default=False, description="convolutions run in a channel-blocked layout with reorders at the "
                                                   "boundaries to other ops (onnxruntime on x86 CPUs)")
    weight_only_compute: Literal["fp32", "fp16", "bf16"] = Field(
        default="fp32", description="the float arithmetic weight-only (wint8/wint4) layers compute in"
    )

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        if v not in BACKEND_SETTINGS:
            raise ValueError(f"unknown backend {v!r}; valid: {', '.join(BACKEND_SETTINGS)}")
        return v

    @model_validator(mode="after")
    def _known_settings(self) -> BackendOption:
        from pydantic import ValidationError

        model = BACKEND_SETTINGS[self.backend]
        unknown = sorted(set(self.options) - set(model.model_fields))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for backend {self.backend}; valid: {sorted(model.model_fields)}")
        try:
            model.model_validate(self.options)
        except ValidationError as e:
            first = e.errors()[0]
            raise ValueError(f"backend {self.backend} option {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        return self

    @property
    def settings(self) -> _BackendSettings:
        """``options`` as the backend's typed settings (defaults filled in)."""
        return BACKEND_SETTINGS[self.backend].model_validate(self.options)

    @field_validator("efficiency_by_precision", "overhead_us_by_precision")
    @classmethod
    def _precision_keys(cls, v: dict[str, float]) -> dict[str, float]:
        return _precision_keys(v)

    @field_validator("kernel_models")
    @classmethod
    def _kernel_keys(cls, v: dict[str, KernelModel]) -> dict[str, KernelModel]:
        valid = technique.precision_names()
        bad = sorted(k for k in v if k.partition(":")[0] not in valid or k.partition(":")[2] not in KERNEL_KINDS)
        if bad:
            raise ValueError(f"kernel_models keys must be '<precision>:<kind>' with a precision in {list(valid)} and "
                             f"a kind in {list(KERNEL_KINDS)}; got {bad}")
        return v

    def efficiency_for(self, precision: str, unit: ComputeUnit) -> float:
        return self.efficiency_by_precision.get(precision, self.efficiency or unit.efficiency)

    def overhead_us_for(self, precision: str, unit: ComputeUnit) -> float:
        return unit.layer_overhead_us + self.overhead_us_by_precision.get(precision, 0.0)

    def compute_precision(self, precision: str) -> str:
        """The arithmetic a layer in ``precision`` runs (what the peak rate is looked up by)."""
        return self.weight_only_compute if technique.get(precision).weight_only else precision

    def activation_bits(self, precision: str) -> int:
        """Bits per activation element of a layer in ``precision`` (weight-only formats: the float they compute in)."""
        return technique.get(self.compute_precision(precision)).activation_bits or 32

    @property
    def label(self) -> str:
        extra = self.options.get("delegate") or self.options.get("provider") or self.options.get("device")
        return f"{self.backend}/{self.unit}" + (f"({extra})" if extra else "")


class Target(_TargetModel):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    description: str
    device_class: Literal["server-gpu", "edge-gpu", "cpu", "mobile", "microcontroller"]
    family: str | None = Field(default=None, description="the family this device belongs to (jetson, x86-cpu, ...; "
                                                         "built-in families: edgeopt/data/targets/_families.yaml)")
    aliases: list[Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")]] = Field(
        default_factory=list, description="other names the built-in catalog resolves to this device (orin-nano); in a "
                                          "user file only recorded; not inherited through base, not in target_sha256")
    sources: list[str] = Field(default_factory=list, description="where the numbers come from (datasheets, vendor "
                                                                 "spec pages, measurements); not part of target_sha256")
    budgets: Budgets
    compute_units: dict[str, ComputeUnit]
    backends: list[BackendOption] = Field(min_length=1, description="in order of preference")

    @model_validator(mode="after")
    def _units_exist(self) -> Target:
        for b in self.backends:
            if b.unit not in self.compute_units:
                raise ValueError(
                    f"backend {b.backend} runs on unit {b.unit!r}, which is not among compute_units "
                    f"{sorted(self.compute_units)}"
                )
            unit = self.compute_units[b.unit]
            missing = sorted({b.compute_precision(p) for p in b.precisions} - set(unit.peak_ops_per_s))
            if missing:
                raise ValueError(
                    f"backend {b.backend} on unit {b.unit!r} lists precisions computing in {missing}, "
                    f"but the unit has no peak rate for them"
                )
        return self


# --------------------------------------------------------------------------- analysis


class LayerInfo(_Frozen):
    """What analysis knows about one compute node."""

    name: str
    op_type: str
    domain: str = ""
    inputs: list[str]
    outputs: list[str]
    weights: list[str] = Field(description="constant inputs (initializers, Constant nodes and folded constants)")
    weight_shapes: list[list[int]] = Field(default_factory=list, description="shapes of ``weights``, same order")
    attributes: dict[str, int | float | str | list[int] | list[float]] = Field(default_factory=dict)
    params: int
    weight_bytes: int = Field(description="bytes of the weights as stored now")
    macs: int
    flops: int = Field(description="non-MAC arithmetic (elementwise, pooling, normalization)")
    input_elems: int
    output_elems: int
    output_shapes: list[list[int]]
    quantizable: bool = Field(description="whether it has weights a quantizer or pruner would change")


class TensorInfo(_Frozen):
    name: str
    shape: list[int]
    dtype: str
    elems: int
    first: int = Field(description="index of the step that creates it (-1: graph input)")
    last: int = Field(description="index of the last step that reads it (len(steps): graph output)")


class ModelAnalysis(_Frozen):
    path: str
    sha256: str
    opset: int
    producer: str
    inputs: dict[str, list[int]]
    outputs: dict[str, list[int]]
    layers: list[LayerInfo]
    tensors: list[TensorInfo] = Field(description="activation tensors, in creation order")
    total_params: int
    total_weight_bytes: int
    total_macs: int
    total_flops: int
    file_bytes: int
    notes: list[str] = Field(default_factory=list)


# --------------------------------------------------------------------------- plans


class LayerPlan(_Frozen):
    name: str
    op_type: str
    precision: Precision
    sparsity: Sparsity = "none"
    sparsity_ratio: float = Field(default=0.0, ge=0, lt=1)
    predicted_ms: float
    weight_bytes: int = Field(description="predicted stored weight bytes after the plan")
    reason: str


class BudgetCheck(_Frozen):
    name: Literal["ram", "storage", "latency_ms"]
    predicted: float
    budget: float
    limit: bool = Field(default=True, description="a limit a plan must meet; False: a goal (the target's latency "
                                                   "unless made a limit), missed only with a warning")

    @property
    def ok(self) -> bool:
        return self.predicted <= self.budget


class AccuracyBudget(_Frozen):
    """How much fidelity a plan may give up, in the metric the data allows: top-1 accuracy drop with labels,
    top-1 disagreement with the original on classification outputs without labels, else an output SNR floor."""

    metric: Literal["accuracy_drop", "top1_disagreement", "snr_db"]
    limit: float = Field(description="largest drop / disagreement, or smallest SNR in dB")
    source: str = Field(description="where the limit comes from: 'default' or the option that set it")

    def describe(self) -> str:
        what = {"accuracy_drop": f"top-1 accuracy drop <= {self.limit:g}",
                "top1_disagreement": f"top-1 agreement with the original >= {1 - self.limit:g}",
                "snr_db": f"output SNR >= {self.limit:g} dB"}[self.metric]
        return f"{what} ({self.source})"


class AccuracyPrediction(_Frozen):
    """What the planner expects the plan to cost in fidelity, from per-layer noise (see :mod:`edgeopt.accuracy`)."""

    budget: AccuracyBudget
    predicted_noise: float = Field(description="predicted output noise power / signal power (sum over layers)")
    noise_cap: float = Field(description="the largest predicted noise the budget allows")
    predicted: float | None = Field(default=None, description="predicted value of the budget's metric")


class Plan(_Frozen):
    """The hand-off between planning and building: everything build needs to replay."""

    schema_version: Literal[1] = 1
    edgeopt_version: str
    model_sha256: str
    target: str
    target_sha256: str = Field(description="hash of the target definition the plan was made for")
    target_definition: Target = Field(description="the resolved target the plan was made for (user files included)")
    backend: str
    unit: str
    backend_options: dict[str, str | int | float | bool] = Field(default_factory=dict)
    input_shapes: dict[str, list[int]]
    layers: list[LayerPlan]
    predicted_latency_ms: float
    predicted_storage_bytes: int
    predicted_ram_bytes: int
    predicted_arena_bytes: int
    budgets: list[BudgetCheck]
    rationale: list[str] = Field(description="plan-level decisions, in order, in words")
    objective: Literal["latency", "fidelity"] = Field(
        default="latency", description="latency: fastest within the accuracy budget; fidelity: most faithful that fits")
    accuracy: AccuracyPrediction | None = Field(default=None, description="the accuracy budget and predicted cost")
    technique_configs: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="pass settings chosen for this model by measurement, per technique "
                                          "(e.g. int8 calibration method); the backend's own rules win over them")

    def layer(self, name: str) -> LayerPlan:
        for lp in self.layers:
            if lp.name == name:
                return lp
        raise KeyError(name)


# --------------------------------------------------------------------------- artifacts and profiles


class ControlStep(_Frozen):
    """One round of accuracy control: a plan built, its fidelity measured, and the decision taken."""

    iteration: int
    summary: str = Field(description="the plan's precisions, e.g. 'int8 47, fp32 6'")
    predicted_noise: float | None = None
    measured: dict[str, float] = Field(default_factory=dict)
    within_budget: bool | None = None
    action: str


class ModelSource(_Frozen):
    """Where the ONNX model came from when it was not given as an ONNX file: an in-memory ``onnx.ModelProto``, or a
    PyTorch module / ``ExportedProgram`` exported by edgeopt (:mod:`edgeopt.modelsrc`), and how the export was
    checked."""

    kind: Literal["onnx-proto", "torch-module", "torch-exported-program"]
    name: str = Field(description="the model's class name (torch) or graph name (ONNX)")
    onnx_sha256: str = Field(description="sha256 of the ONNX file edgeopt wrote and built from")
    exporter: str | None = Field(default=None, description="e.g. 'torch.onnx.export (TorchScript, dynamo=False)'")
    torch_version: str | None = None
    opset: int | None = None
    input_names: list[str] = Field(default_factory=list)
    input_shapes: dict[str, list[int]] = Field(default_factory=dict, description="the example inputs' shapes (static)")
    output_max_abs_diff: float | None = Field(
        default=None, description="onnxruntime's outputs vs torch's on the example inputs: largest absolute difference")
    tolerance: float | None = Field(default=None, description="the largest difference accepted")


class RecoveryRecord(_Frozen):
    """What a recovery (distillation fine-tuning of a compressed student against its original as teacher,
    :func:`edgeopt.recover.recover`) did: what a manifest records about it."""

    steps: int = Field(description="optimizer steps taken")
    steps_planned: int
    epochs: float = Field(description="passes over the training samples (steps * batch / samples)")
    samples: int = Field(description="training samples used")
    batch_size: int
    augmentation: list[str] = Field(default_factory=list, description="augmentations applied to teacher and student alike")
    labels_used: bool = False
    loss: str = Field(description="the loss terms and weights")
    features_matched: list[str] = Field(default_factory=list, description="intermediate tensors matched (same name and shape)")
    loss_curve: list[float] = Field(default_factory=list, description="training loss, averaged over windows (at most 50 points)")
    lr: float
    time_s: float = Field(description="wall time of the whole recovery (conversion, training, export, checks)")
    cpu_time_s: float = Field(description="CPU time of this process over it (wall time inflates on a shared machine)")
    device: str = Field(description="cpu or cuda")
    threads: int
    seed: int
    stopped_early: bool = False
    stop_reason: str = ""
    masked: dict[str, float] = Field(default_factory=dict, description="weight -> fraction of zeros kept fixed (sparsity masks)")
    quantized: dict[str, int] = Field(default_factory=dict, description="weight -> bits of its learned (LSQ) fake-quant grid")
    validation: str = Field(default="", description="the samples checkpoints are scored on: held out of the training "
                                                    "samples, given, or (too few samples) the training samples")
    validation_samples: int = 0
    block_phase: dict[str, Any] = Field(default_factory=dict, description="block-wise reconstruction before "
                                        "end-to-end training: blocks, steps, time_s, per-block [tensor, steps, first "
                                        "loss, last loss], validation scores before/after, kept")
    agreement_before: float | None = Field(default=None, description="student/teacher top-1 agreement on the "
                                                                      "validation samples before recovery (classifiers)")
    agreement_after: float | None = None
    export_max_abs_error: float = Field(description="largest |onnxruntime - torch| output difference of the exported student")
    selected_step: int | None = Field(default=None, description="the step whose weights were kept: the best-scoring "
                                                                "checkpoint (0: the compressed model as it came)")
    checkpoint_scores: list[list[float]] = Field(default_factory=list, description="[step, top-1 agreement, -relative "
                                                 "output noise] of each checkpoint on the validation samples")
    heldout_before: dict[str, float] = Field(default_factory=dict, description="the compressed model against the "
                                             "original on held-out samples before recovery (a build's check)")
    heldout_after: dict[str, float] = Field(default_factory=dict, description="... and after recovery")
    kept: bool = Field(default=True, description="whether the build kept the recovered model (False: recovery did "
                                                 "not beat the post-training model on held-out samples)")


class FitRecord(_Frozen):
    """How a build made a model fit its target's RAM/flash (``--recover``, ``--allow-resolution``): the structural
    change (:func:`edgeopt.fit.fit_search`), the recovery of the fitted model against the original, and how far the
    result is from the original on held-out samples."""

    summary: str
    rationale: list[str] = Field(default_factory=list)
    original_side: int | None = None
    resolution: int | None = Field(default=None, description="the new square input side; None: unchanged")
    params_before: int
    params_after: int
    predicted_ram: int
    predicted_storage: int
    heldout_samples: int = 0
    agreement_fitted: float | None = Field(default=None, description="top-1 agreement of the fitted float model with "
                                           "the original (at full resolution) on held-out samples, before recovery")
    agreement_recovered: float | None = Field(default=None, description="... after recovery")
    snr_db_fitted: float | None = None
    snr_db_recovered: float | None = None
    recovery: RecoveryRecord | None = None


class RecoverySettings(_Frozen):
    """How a build recovers a compressed model (``--recover``): distillation fine-tuning against the original
    (:func:`edgeopt.recover.recover`), after pruning and before the backend sets numeric formats."""

    steps: int = Field(default=300, ge=1, description="optimizer steps at most")
    time_budget_s: float | None = Field(default=600.0, gt=0, description="stop after this many seconds (None: the steps)")
    lr: float = Field(default=1e-4, gt=0, description="peak learning rate (Adam, cosine decay)")
    block_steps: int = Field(default=100, ge=0, description="block-wise reconstruction steps per block before "
                                                            "end-to-end training (0: none); kept only when it helps")
    seed: int = 0


class Artifact(_Frozen):
    """A built model on disk plus what is known about it (serialised as manifest.json)."""

    schema_version: Literal[1] = 1
    target: str
    backend: str
    files: dict[str, str] = Field(description="relative path -> sha256")
    primary: str = Field(description="relative path of the file a runtime loads")
    size_bytes: int
    plan: Plan
    tool_versions: dict[str, str]
    predicted_latency_ms: float
    measured_latency_ms: float | None = None
    measured_on: str | None = Field(default=None, description="the machine measured_latency_ms comes from")
    measured_on_target: bool = Field(default=False, description="whether that machine is of the target's device class")
    accuracy: dict[str, float] = Field(default_factory=dict, description="metric -> value (baseline_, delta_)")
    numerics: dict[str, str] = Field(
        default_factory=dict, description="how it computes and how it was checked (int8 scheme and why, validation reference)")
    fidelity: str = Field(default="", description="whether accuracy was measured on the artifact, how, or why not")
    accuracy_control: list[ControlStep] = Field(
        default_factory=list, description="each build measured against the accuracy budget and what was done next")
    project: dict[str, str] | None = Field(
        default=None, description="the project file the build's settings came from: path, sha256 (and table, for a "
                                  "pyproject.toml); None: no project file")
    source: ModelSource | None = Field(default=None, description="how the model was exported (torch, in-memory ONNX)")
    recovery: RecoveryRecord | None = Field(default=None, description="the distillation fine-tuning the build ran "
                                                                      "after compression (--recover), else None")
    fit: FitRecord | None = Field(default=None, description="how the model was made to fit the target's RAM/flash "
                                                            "(--recover on a model over them), else None")
    created_utc: str


class OpTiming(_Frozen):
    name: str
    op_type: str
    mean_us: float
    share: float


class Profile(_Frozen):
    schema_version: Literal[1] = 1
    artifact_sha256: str
    target: str
    backend: str
    unit: str | None = None
    device: str
    host: dict[str, str]
    threads: int
    warmup: int
    repeats: int
    latency_ms: dict[str, float] = Field(description="p50, p90, p99, mean, min")
    peak_memory_bytes: int | None = None
    ops: list[OpTiming] = Field(default_factory=list)
    predicted_latency_ms: float | None = None
    on_target_class: bool | None = Field(
        default=None, description="whether the machine measured is of the artifact's target class (only such profiles "
                                  "calibrate the target's predictions); None: not recorded (older profiles)")
    created_utc: str
