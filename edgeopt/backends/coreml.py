"""Core ML (iOS): .mlpackage via coremltools' MIL builder, compressed with coremltools.optimize.

``convert`` translates the (cleaned) ONNX graph to a MIL program (:mod:`._coreml_mil`),
converts it to an ML program (``model.mlpackage``, iOS17 or later) computing in
fp16 (fp32 where the plan says so), then applies the plan's weight formats with
``coremltools.optimize.coreml``: ``wint8`` layers get per-channel linear int8
weights, ``wint4`` layers 4-bit k-means palettization (or linear int4 per block,
backend option ``wint4: linear``), layers planned ``unstructured``/``2:4`` sparse
get magnitude pruning.  ``coreml.json`` records what was applied.

Core ML predicts only on macOS.  Elsewhere the package is validated without it:
its spec (inputs, outputs, types, compressed-weight ops) is read back and its MIL
program is re-exported to ONNX (:func:`onnx_equivalent`: weights decompressed,
fp16 tensors rounded after every op) and compared with the source model in
onnxruntime.
"""

from __future__ import annotations

import json
import platform
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import EdgeoptError
from ..types import Artifact, BackendOption, ModelAnalysis, Plan
from . import _ops
from ._coreml_mil import SUPPORTED_OPS as MIL_OPS
from ._coreml_mil import refusal as mil_refusal
from .base import Backend, Runner, RuntimeUnavailable, make_artifact, tool_versions

if TYPE_CHECKING:  # pragma: no cover
    import onnx

    from ..calibration import CalibrationData

SDK_MODULES = ("coremltools",)
SDK_LABEL = "coremltools"

#: Ops folded away before translation (static shapes: Core ML inputs are fixed-size here).
FOLDED_OPS = frozenset({"Shape", "Size", "Constant", "ConstantOfShape", "Range"})


def _attributes(layer, option: BackendOption, analysis: ModelAnalysis) -> str | None:
    """The translator's own attribute-level refusals (Resize modes, Einsum equations, ...)."""
    return mil_refusal(layer.op_type, dict(layer.attributes)) if layer.domain in ("", "ai.onnx") else None


def check_ops(analysis: ModelAnalysis, option: BackendOption) -> list[str]:
    scalars = [f"{n}: a scalar (rank-0) model input; Core ML inputs have rank >= 1 (export it as a [1] tensor)"
               for n, shape in analysis.inputs.items() if len(shape) == 0]
    return scalars + _ops.check_layers(analysis, option, _ops.COREML_OPS & (MIL_OPS | FOLDED_OPS),
                                       [_ops.max_rank(5), _attributes])


# --------------------------------------------------------------------------- building

PACKAGE = "model.mlpackage"
RECORD = "coreml.json"
WEIGHTS = Path("Data") / "com.apple.CoreML" / "weights" / "weight.bin"
COMPRESSED_OPS = ("constexpr_affine_dequantize", "constexpr_lut_to_dense", "constexpr_sparse_to_dense",
                  "constexpr_blockwise_shift_scale", "constexpr_lut_to_sparse", "constexpr_sparse_blockwise_shift_scale")


def _find_op(prog, name: str):
    """A converted program's op for a builder op name (the fp16 pass renames ops ``<name>_cast_fp16``)."""
    ops = {op.name: op for op in prog.functions["main"].operations}
    return ops.get(name) or ops.get(f"{name}_cast_fp16")


def _program(mlmodel):
    from coremltools.converters.mil.frontend.milproto import load as milproto_load
    from coremltools.models import utils as model_utils

    return model_utils._convert_model_spec_to_pymil_prog(mlmodel, mlmodel.get_spec().specificationVersion,
                                                          milproto_load.load)


def _compression_plan(plan: Plan, layers: dict[str, list[str]], weights: dict[str, str], wint4: str):
    """(prune, quantize) jobs: lists of (onnx layer, MIL op, weight param, config kind, detail)."""
    prune, quant, skipped = [], [], []
    for lp in plan.layers:
        wants_q = lp.precision in ("wint8", "wint4")
        wants_s = lp.sparsity in ("unstructured", "2:4")
        if not (wants_q or wants_s):
            continue
        ops = layers.get(lp.name)
        main = ops[0] if ops else None
        if main is None or main not in weights:
            skipped.append(f"{lp.name}: no weight-carrying Core ML op" + ("" if ops is not None else " (layer not in the model)"))
            continue
        if wants_s:
            prune.append((lp.name, main, weights[main], lp.sparsity, lp.sparsity_ratio or 0.5))
        if wants_q:
            kind = "int8" if lp.precision == "wint8" else ("int4" if wint4 == "linear" else "palettize4")
            quant.append((lp.name, main, weights[main], kind, None))
    return prune, quant, skipped


def _op_config(kind: str, detail):
    from coremltools.optimize.coreml import OpLinearQuantizerConfig, OpMagnitudePrunerConfig, OpPalettizerConfig

    if kind == "int8":
        return OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=1)
    if kind == "int4":
        return OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=32,
                                       weight_threshold=1)
    if kind == "palettize4":
        return OpPalettizerConfig(mode="kmeans", nbits=4, granularity="per_tensor", weight_threshold=1)
    if kind == "2:4":
        return OpMagnitudePrunerConfig(n_m_ratio=(2, 4), weight_threshold=1)
    return OpMagnitudePrunerConfig(target_sparsity=float(detail), weight_threshold=1)


_DESCRIBE = {"int8": "linear int8 per-channel (symmetric)", "int4": "linear int4 per-block of 32 (symmetric)",
             "palettize4": "4-bit k-means palettization (per tensor)", "2:4": "2:4 magnitude pruning",
             "unstructured": "unstructured magnitude pruning"}


def _apply(mlmodel, jobs, fn, joint: bool, record: list[dict], skipped: list[str]):
    """Run one coremltools.optimize function on the weights of ``jobs`` (addressed by their current op names); a
    weight coremltools' passes fused away from its op (e.g. a MatMul + Add into ``linear``, its weight no longer a
    const input) stays uncompressed and is listed in ``skipped``."""
    from coremltools.optimize.coreml import OptimizationConfig

    if not jobs:
        return mlmodel
    prog = _program(mlmodel)
    configs = {}
    for layer, op_name, param, kind, detail in jobs:
        op = _find_op(prog, op_name)
        var = op.inputs.get(param) if op is not None else None
        if var is None or var.op is None or not (var.op.op_type == "const" or var.op.op_type.startswith("constexpr_")):
            skipped.append(f"{layer}: Core ML op {op_name} was rewritten by coremltools' passes (its {param} is no "
                           f"longer a constant of it): left uncompressed ({_DESCRIBE[kind]} planned)")
            continue
        configs[var.op.name] = _op_config(kind, detail)
        entry = {"layer": layer, "op": op.name, "weight": var.op.name, "shape": list(var.shape), "format": _DESCRIBE[kind]}
        if kind == "unstructured":
            entry["target_sparsity"] = float(detail)
        record.append(entry)
    kwargs = {"joint_compression": True} if joint else {}
    if not configs:
        return mlmodel
    return fn(mlmodel, OptimizationConfig(op_name_configs=configs), **kwargs)


def build_mlpackage(model: onnx.ModelProto, plan: Plan, path: Path) -> dict[str, Any]:
    """Translate, convert and compress ``model`` per ``plan`` into the .mlpackage ``path``; returns the record."""
    from .._quiet import import_quietly

    import_quietly("coremltools")  # its version notices on first import
    import coremltools as ct
    from coremltools.optimize.coreml import linear_quantize_weights, palettize_weights, prune_weights

    from . import _coreml_mil as cm

    opts = plan.backend_options
    wint4 = str(opts.get("wint4", "palettize"))
    if wint4 not in ("palettize", "linear"):
        raise EdgeoptError(f"backend option wint4={wint4!r}: valid values are palettize, linear")
    tr, prepared = cm.to_mil(model, plan.input_shapes)
    prune, quant, skipped = _compression_plan(plan, tr.layers, tr.weights, wint4)
    joint = bool(prune and quant and {j[1] for j in prune} & {j[1] for j in quant})
    ios18 = joint or any(j[3] == "int4" for j in quant)
    target = ct.target.iOS18 if ios18 else ct.target.iOS17

    precisions = {lp.name: lp.precision for lp in plan.layers}
    fp32_ops = {op for name, ops in tr.layers.items() if precisions.get(name) == "fp32" for op in ops}
    all_ops = {op for ops in tr.layers.values() for op in ops}
    if fp32_ops and fp32_ops >= all_ops:
        precision, compute = "fp32", ct.precision.FLOAT32
    elif fp32_ops:
        precision = "mixed"
        compute = ct.transform.FP16ComputePrecision(op_selector=lambda op: op.name not in fp32_ops)
    else:
        precision, compute = "fp16", ct.precision.FLOAT16

    pipeline = ct.PassPipeline.DEFAULT
    pipeline.remove_passes(list(cm.SKIPPED_PASSES))
    mlmodel = ct.convert(tr.program, convert_to="mlprogram", minimum_deployment_target=target,
                         compute_precision=compute, pass_pipeline=pipeline)
    applied: list[dict] = []
    mlmodel = _apply(mlmodel, prune, prune_weights, False, applied, skipped)
    for kind_set, fn in ((("int8", "int4"), linear_quantize_weights), (("palettize4",), palettize_weights)):
        mlmodel = _apply(mlmodel, [j for j in quant if j[3] in kind_set], fn, joint, applied, skipped)
    mlmodel.short_description = f"edgeopt {plan.target}/{plan.unit} plan"
    mlmodel.save(str(path))
    return {
        "package": path.name,
        "deployment_target": "iOS18" if ios18 else "iOS17",
        "compute_precision": precision,
        "fp32_ops": sorted(fp32_ops) if precision == "mixed" else [],
        "compute_units": str(opts.get("compute_units", "ALL")),
        "inputs": tr.inputs,
        "outputs": tr.outputs,
        "input_shapes": {k: list(v) for k, v in cm.static_shapes(prepared, plan.input_shapes).items()},
        "input_types": tr.input_types,
        "layers": tr.layers,
        "compression": applied,
        "not_compressed": skipped,
        "skipped_mil_passes": list(cm.SKIPPED_PASSES),
    }


# --------------------------------------------------------------------------- validation off macOS


def validate_package(package: Path, record: Mapping[str, Any]) -> dict[str, Any]:
    """Check a saved .mlpackage's spec against what was built (raises on a mismatch) and describe it."""
    from . import _coreml_mil as cm

    package = Path(package)
    if not (package / "Manifest.json").is_file():
        raise EdgeoptError(f"{package} is not an .mlpackage (no Manifest.json)")
    mlmodel, spec, prog = cm.load_program(str(package))
    if spec.WhichOneof("Type") != "mlProgram":
        raise EdgeoptError(f"{package}: expected an ML program, found {spec.WhichOneof('Type')}")
    want_version = 9 if record.get("deployment_target") == "iOS18" else 8
    if spec.specificationVersion < want_version:
        raise EdgeoptError(f"{package}: specification version {spec.specificationVersion} < {want_version}")
    from coremltools.proto import FeatureTypes_pb2 as ft

    def describe(features):
        out = {}
        for f in features:
            if f.type.WhichOneof("Type") != "multiArrayType":
                raise EdgeoptError(f"{package}: feature {f.name} is not a multi-array")
            arr = f.type.multiArrayType
            out[f.name] = {"shape": [int(d) for d in arr.shape], "dtype": ft.ArrayFeatureType.ArrayDataType.Name(arr.dataType)}
        return out

    ins, outs = describe(spec.description.input), describe(spec.description.output)
    shapes = record["input_shapes"]
    for onnx_name, mil_name in record["inputs"].items():
        got = ins.get(mil_name)
        want = record.get("input_types", {}).get(onnx_name, "FLOAT32")
        if got is None or got["shape"] != list(shapes[onnx_name]) or got["dtype"] != want:
            raise EdgeoptError(f"{package}: input {mil_name} is {got}, expected {want} {shapes[onnx_name]}")
    if set(ins) != set(record["inputs"].values()) or list(outs) != list(record["outputs"].values()):
        raise EdgeoptError(f"{package}: inputs/outputs {list(ins)}/{list(outs)} differ from the model's "
                           f"{list(record['inputs'].values())}/{list(record['outputs'].values())}")
    for name, o in outs.items():
        if o["dtype"] != "FLOAT32":
            raise EdgeoptError(f"{package}: output {name} is {o['dtype']}, expected FLOAT32")
    ops = Counter(op.op_type for op in prog.functions["main"].operations)
    weight_file = package / WEIGHTS
    return {
        "specification_version": int(spec.specificationVersion),
        "inputs": ins,
        "outputs": outs,
        "ops": dict(sorted((k, v) for k, v in ops.items() if k != "const" and not k.startswith("constexpr_"))),
        "compressed_weights": {k: ops[k] for k in COMPRESSED_OPS if ops.get(k)},
        "weight_bytes": weight_file.stat().st_size if weight_file.is_file() else 0,
    }


def onnx_equivalent(artifact_dir: Path, round_fp16: bool = True) -> onnx.ModelProto:
    """The ONNX model computing what the artifact's Core ML program computes (batch as built, usually 1).

    Re-exported from the saved .mlpackage: compressed weights decompressed from their
    ``constexpr_*`` ops, fp16 tensors rounded to fp16 after each op (``round_fp16``);
    inputs and outputs carry the source ONNX model's names.
    """
    import onnx

    from . import _coreml_mil as cm

    artifact_dir = Path(artifact_dir)
    record = json.loads((artifact_dir / RECORD).read_text())
    _, _, prog = cm.load_program(str(artifact_dir / record["package"]))
    model = cm.to_onnx(prog, round_fp16=round_fp16)
    g = model.graph
    rename = {**{m: o for o, m in record["inputs"].items()}, **{m: o for o, m in record["outputs"].items()}}
    rename = {m: o for m, o in rename.items() if m != o}
    if rename:
        for n in g.node:
            for i, name in enumerate(n.input):
                n.input[i] = rename.get(name, name)
            for i, name in enumerate(n.output):
                n.output[i] = rename.get(name, name)
        for vi in [*g.input, *g.output]:
            vi.name = rename.get(vi.name, vi.name)
    onnx.checker.check_model(model)
    return model


class OnnxEquivalentRunner(Runner):
    """Runs :func:`onnx_equivalent` in onnxruntime, one batch-sized slice at a time."""

    def __init__(self, artifact_dir: Path, round_fp16: bool = True):
        from ..fidelity import session

        model = onnx_equivalent(artifact_dir, round_fp16)
        self.session = session(model)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._batch = int(self.session.get_inputs()[0].shape[0]) if self.session.get_inputs()[0].shape else 1
        self._dtypes = {i.name: np.int32 if i.type == "tensor(int32)" else np.float32 for i in self.session.get_inputs()}

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        n = len(next(iter(feeds.values())))
        parts = [self.session.run(None, {k: np.asarray(v[i:i + self._batch], self._dtypes.get(k, np.float32))
                                         for k, v in feeds.items()})
                 for i in range(0, n, self._batch)]
        return [np.concatenate([p[j] for p in parts], axis=0) for j in range(len(self.output_names))]


def compare_with_onnx(artifact_dir: Path, reference: onnx.ModelProto, feeds: Mapping[str, np.ndarray],
                      labels: np.ndarray | None = None):
    """:class:`~edgeopt.fidelity.Fidelity` of the artifact's ONNX equivalent against ``reference`` on ``feeds``."""
    from ..fidelity import compare_outputs, session

    sess = session(reference)
    dim = sess.get_inputs()[0].shape[0] if sess.get_inputs()[0].shape else None
    n = len(next(iter(feeds.values())))
    step = dim if isinstance(dim, int) and dim > 0 else n  # a fixed-batch source model runs slice by slice
    parts = [sess.run(None, {k: np.asarray(v[i:i + step]) for k, v in feeds.items()}) for i in range(0, n, step)]
    ref = [np.concatenate([p[j] for p in parts], axis=0) for j in range(len(parts[0]))]
    out = OnnxEquivalentRunner(artifact_dir).run(feeds)
    return compare_outputs(ref, out, labels)


# --------------------------------------------------------------------------- running (macOS)


class CoreMLRunner(Runner):
    def __init__(self, package: Path, record: Mapping[str, Any]):
        from .._quiet import import_quietly

        import_quietly("coremltools")  # its version notices on first import
        import coremltools as ct

        units = getattr(ct.ComputeUnit, str(record.get("compute_units", "ALL")), ct.ComputeUnit.ALL)
        self.model = ct.models.MLModel(str(package), compute_units=units)
        self._inputs, self._outputs = dict(record["inputs"]), dict(record["outputs"])
        self._batch = {k: int(v[0]) if v else 1 for k, v in record["input_shapes"].items()}
        self._dtypes = {k: np.int32 if t == "INT32" else np.float32 for k, t in record.get("input_types", {}).items()}
        self.input_names, self.output_names = list(self._inputs), list(self._outputs)

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        n = len(next(iter(feeds.values())))
        b = max(min(self._batch.values(), default=1), 1)
        parts = []
        for i in range(0, n, b):
            res = self.model.predict({self._inputs[k]: np.asarray(v[i:i + b], self._dtypes.get(k, np.float32))
                                      for k, v in feeds.items()})
            parts.append([np.asarray(res[self._outputs[o]]) for o in self.output_names])
        return [np.concatenate([p[j] for p in parts], axis=0) for j in range(len(self.output_names))]


def validation_statement(record: Mapping[str, Any], artifact: Artifact | None = None) -> str:
    """What the build checked of the package's computation: only a build that ran the ONNX equivalent on
    data (the backend's, recorded in ``coreml.json``, or the pipeline's, recorded in the manifest) says the
    artifact was validated against it."""
    eq = (record.get("validation") or {}).get("onnx_equivalent") or {}
    snr = eq.get("snr_db")
    if not eq and artifact is not None and artifact.numerics.get("validated_with"):
        snr = artifact.accuracy.get("snr_db")
        eq = {"snr_db": snr} if snr is not None else {}
    if eq:
        return ("the artifact was validated against its ONNX equivalent"
                + (f" (SNR {snr:.1f} dB vs the source model)" if isinstance(snr, (int, float)) else ""))
    return "the artifact was NOT validated (built without evaluation data: only its spec was checked)"


class CoreMLBackend(Backend):
    precisions = frozenset({"fp32", "fp16", "wint8", "wint4"})
    name = "coreml"
    sdk_modules = SDK_MODULES
    sdk_label = SDK_LABEL
    runtime_dist = "coremltools"

    def convert(self, model: onnx.ModelProto, plan: Plan, out_dir: Path,
                calib: CalibrationData | None = None) -> Artifact:
        self.require()
        out_dir = Path(out_dir)
        record = build_mlpackage(model, plan, out_dir / PACKAGE)
        record["validation"] = validate_package(out_dir / PACKAGE, record)
        accuracy: dict[str, float] = {}
        if calib is not None:  # what the package computes, checked here through its ONNX equivalent
            (out_dir / RECORD).write_text(json.dumps(record, indent=2) + "\n")
            sub = calib.subset(min(len(calib), 32))
            fid = compare_with_onnx(out_dir, model, sub.feeds(), sub.labels)
            record["validation"]["onnx_equivalent"] = fid.model_dump()
            accuracy["equivalent_snr_db"] = fid.snr_db
            if fid.top1_agreement is not None:
                accuracy["equivalent_top1_agreement"] = fid.top1_agreement
        (out_dir / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        return make_artifact(out_dir, PACKAGE, plan, self.name, tool_versions("coremltools"), accuracy)

    def load(self, artifact: Artifact, artifact_dir: Path, threads: int | None = None) -> Runner:
        self._no_threads(threads)
        self.require()
        artifact_dir = Path(artifact_dir)
        record = json.loads((artifact_dir / RECORD).read_text())
        if platform.system() != "Darwin":
            raise RuntimeUnavailable(f"Core ML prediction needs macOS; {validation_statement(record, artifact)} "
                                     f"(edgeopt.backends.coreml.onnx_equivalent('{artifact_dir}') runs it in onnxruntime here)")
        return CoreMLRunner(artifact_dir / artifact.primary, record)

    def reference(self, artifact: Artifact, artifact_dir: Path) -> Runner | None:
        """The program's ONNX equivalent (its MIL ops exported back to ONNX, fp16 rounding kept), in onnxruntime;
        None where a MIL op has no ONNX export (the artifact then says its fidelity was not measured)."""
        try:
            runner = OnnxEquivalentRunner(Path(artifact_dir))
        except Exception:  # an op the exporter lacks: no stand-in, reported as not measured  # noqa: BLE001
            return None
        runner.description = ("the Core ML program's ONNX equivalent (its MIL ops exported back to ONNX, fp16 "
                              "rounding kept, run in onnxruntime): Core ML prediction needs macOS")
        return runner


BACKEND = CoreMLBackend()
