"""Graph cleanup: static control flow folded (:mod:`.fold_control`), Constant nodes -> initializers, constant
folding (static ``Shape`` included), Conv+BatchNormalization fusion, Identity/Dropout removal.

:func:`normalize` is the one normalization the passes and the TFLite / Core ML
translators run.  The generic graph plumbing is onnx-ir's (constant lifting, dead
node and initializer removal, topological sort); what it does not do is here:
folding through onnxruntime (static ``Shape``/``Size`` included, several rounds for
``Shape -> Cast -> Slice -> Concat`` chains), BatchNormalization fusion, and
Identity/Dropout removal that keeps graph output names.

Quantizers and pruners look for weights among initializers; PaddlePaddle exports
(PP-OCR) store them as ``Constant`` nodes, so every weight-changing pass runs
:func:`constants_to_initializers` (or :func:`normalize`) first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from . import PassConfig, PassOutcome
from ._util import Graph, ensure_names

if TYPE_CHECKING:  # pragma: no cover
    import onnx

NEEDS_CALIBRATION = False


class Config(PassConfig):
    fold_control_flow: bool = True
    constants_to_initializers: bool = True
    fold_constants: bool = True
    fuse_batchnorm: bool = True
    remove_identity: bool = True


def _constant_array(node: onnx.NodeProto) -> np.ndarray | None:
    import onnx

    for a in node.attribute:
        if a.name == "value":
            return onnx.numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), np.float32)
        if a.name == "value_int":
            return np.array(a.i, np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), np.int64)
    return None


def _ir_passes(model: onnx.ModelProto, *passes) -> None:
    """Run onnx-ir passes on ``model`` in place."""
    import onnx_ir as ir

    im = ir.from_proto(model)
    for p in passes:
        p(im)
    model.CopyFrom(ir.to_proto(im))


def constants_to_initializers(model: onnx.ModelProto) -> list[str]:
    """Turn the main graph's Constant nodes into initializers (onnx-ir's ``LiftConstantsToInitializersPass``, every
    Constant whatever its size or attribute kind).

    Args:
        model: changed in place (lifting a constant never changes the function, so no node scoping).

    Returns:
        The names of the Constant nodes lifted.
    """
    from onnx_ir.passes.common import LiftConstantsToInitializersPass

    done = [n.name or n.output[0] for n in model.graph.node if n.op_type == "Constant"]
    if done:
        _ir_passes(model, LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0))
    return done


def tidy(model: onnx.ModelProto) -> None:
    """Remove dead nodes and initializers and sort the nodes topologically (onnx-ir), in place."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

    _ir_passes(model, RemoveUnusedNodesPass(), TopologicalSortPass())


#: normalize() step names, as reports print them
STEPS = {"control": "static If/Loop folded", "constants": "Constant -> initializer", "fold": "constant folding",
         "batchnorm": "BatchNormalization fused into Conv", "identity": "Identity/Dropout removed"}


def normalize(model: onnx.ModelProto, config: PassConfig | None = None, *, constants: bool = True, fold: bool = True,
              batchnorm: bool = True, identity: bool = True, rounds: int = 3,
              outcome: PassOutcome | None = None, control: bool = True) -> dict[str, list[str]]:
    """The graph normalization every pass and translator runs, in place: nodes named, ``If`` nodes whose condition
    and ``Loop`` nodes whose trip count are static at the model's input shapes folded into the graph
    (:func:`.fold_control.fold_control_flow`; control flow on input values stays), Constant nodes lifted to
    initializers, constants folded (static ``Shape`` included; up to ``rounds`` rounds, since ``Shape -> Cast ->
    Slice -> Concat`` chains fold step by step), BatchNormalization fused into the Conv before it, Identity/Dropout
    removed, then dead nodes removed and the nodes sorted.

    Args:
        model: the model, changed in place.
        config: node scoping for folding, fusion and identity removal (None: every node).
        constants: lift Constant nodes to initializers (folding and fusion see only initializers otherwise).
        fold: fold constants.
        batchnorm: fuse BatchNormalization into convolutions.
        identity: remove Identity and inference-mode Dropout nodes (not those producing a graph output).
        rounds: folding rounds at most.
        outcome: where fusion records the convolutions it had to skip.
        control: fold static control flow.

    Returns:
        Step name (:data:`STEPS`) -> the nodes it changed (empty lists for steps that changed nothing).
    """
    from .fold_control import fold_control_flow

    ensure_names(model)
    done = {"control": fold_control_flow(model) if control else []}
    done.update({"constants": constants_to_initializers(model) if constants else [], "fold": [], "batchnorm": [],
                 "identity": []})
    if fold:
        for _ in range(rounds):
            names = fold_constants(model, config)
            if not names:
                break
            done["fold"] += names
    if batchnorm:
        done["batchnorm"] = fuse_batchnorm(model, config, outcome)
    if identity:
        done["identity"] = remove_identity(model, config)
    tidy(model)
    return done


def _static_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:
        return {}
    out = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") and d.dim_value > 0 for d in dims):
            out[vi.name] = [d.dim_value for d in dims]
    return out


#: Folding never materializes an output bigger than this, unless its inputs are within 8x of it (a
#: ``DequantizeLinear`` of int4/int8 weights): a ``ConstantOfShape``/``Expand``/``Tile`` of a constant shape can ask
#: for gigabytes from a few bytes, and kept as a node it costs nothing until the model runs.
FOLD_MAX_BYTES = 16 << 20
#: Ops whose output can be far bigger than their inputs: not folded when the output's static shape is unknown.
_EXPANDING_OPS = frozenset({"ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Upsample", "Pad", "OneHot",
                            "EyeLike", "Einsum", "MatMul", "Gemm", "Conv", "ConvTranspose"})


def _fold_too_big(n: onnx.NodeProto, shapes: dict[str, list[int]], sizes: dict[str, int]) -> bool:
    """Whether folding ``n`` could materialize a big tensor (sizes: bytes of the constants known so far)."""
    outs = [o for o in n.output if o]
    if any(o not in shapes for o in outs):
        return n.op_type in _EXPANDING_OPS
    out_bytes = sum(int(np.prod(shapes[o], dtype=object)) * 8 for o in outs)  # 8: the widest element type
    in_bytes = sum(sizes.get(i, 0) for i in n.input if i)
    return out_bytes > max(FOLD_MAX_BYTES, 8 * in_bytes)


def fold_constants(model: onnx.ModelProto, config: PassConfig | None = None) -> list[str]:
    """Evaluate nodes whose inputs are all constant (and Shape of static tensors); returns folded node names.

    Nodes whose outputs would be big (:data:`FOLD_MAX_BYTES`, :func:`_fold_too_big`) stay nodes."""
    import onnx

    from ..fidelity import session

    g = Graph(model)
    shapes = _static_shapes(model)
    const = set(g.inits)
    sizes = {name: int(np.prod(t.dims, dtype=object)) * 8 for name, t in g.inits.items()}
    foldable: list[onnx.NodeProto] = []
    for n in model.graph.node:
        if config is not None and not config.selects(n.name):
            continue
        if n.op_type.startswith("Random") or n.domain not in ("", "ai.onnx") or any(a.HasField("g") for a in n.attribute):
            continue
        if n.op_type in ("Shape", "Size") and n.input[0] in shapes and n.input[0] not in const:
            shp = np.array(shapes[n.input[0]], np.int64)
            start = next((a.i for a in n.attribute if a.name == "start"), 0)
            end = next((a.i for a in n.attribute if a.name == "end"), None)
            val = shp[start:end] if n.op_type == "Shape" else np.array(int(np.prod(shp)), np.int64)
            g.set_initializer(n.output[0], val)
            const.add(n.output[0])
            foldable.append(n)
            continue
        if n.input and all((not i) or i in const for i in n.input):
            if _fold_too_big(n, shapes, sizes):
                continue
            foldable.append(n)
            const.update(n.output)
            for o in n.output:
                if o in shapes:
                    sizes[o] = int(np.prod(shapes[o], dtype=object)) * 8
    if not foldable:
        return []
    folded_ids = {id(n) for n in foldable}
    needed = [o for n in foldable for o in n.output if o and o not in g.inits]
    values: dict[str, np.ndarray] = {}
    if needed:
        sub = onnx.helper.make_graph([n for n in foldable if n.op_type not in ("Shape", "Size") or n.input[0] in const],
                                     "fold", [], [onnx.helper.make_value_info(o, onnx.TypeProto()) for o in needed],
                                     initializer=list(model.graph.initializer))
        m = onnx.helper.make_model(sub, opset_imports=list(model.opset_import))
        m.ir_version = model.ir_version
        try:
            res = session(m, optimize=False).run(needed, {})
        except Exception:
            from onnx.reference import ReferenceEvaluator

            res = ReferenceEvaluator(m).run(needed, {})
        values = dict(zip(needed, res))
    for name, v in values.items():
        g.set_initializer(name, np.asarray(v))
    keep = [n for n in model.graph.node if id(n) not in folded_ids]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    Graph(model).remove_unused_initializers()
    return [n.name for n in foldable]


def fuse_batchnorm(model: onnx.ModelProto, config: PassConfig | None = None, outcome: PassOutcome | None = None) -> list[str]:
    """Fold BatchNormalization into the Conv before it; returns the names of the convs changed."""
    g = Graph(model)
    fused: list[str] = []
    drop: set[int] = set()
    for conv in list(model.graph.node):
        if conv.op_type != "Conv" or (config is not None and not config.selects(conv.name)):
            continue
        bn = g.only_consumer(conv.output[0])
        if bn is None or bn.op_type != "BatchNormalization":
            continue
        w = g.array(conv.input[1])
        params = [g.array(i) for i in bn.input[1:5]]
        if w is None or any(p is None for p in params):
            if outcome is not None:
                outcome.skip(conv.name, "BatchNormalization parameters or conv weight are not constant")
            continue
        scale, bias, mean, var = (p.astype(np.float64) for p in params)
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        k = scale / np.sqrt(var + eps)
        b = g.array(conv.input[2]).astype(np.float64) if len(conv.input) > 2 and conv.input[2] else np.zeros_like(mean)
        w_name = g.unique(f"{conv.name}.weight_bnfused")
        b_name = g.unique(f"{conv.name}.bias_bnfused")
        g.set_initializer(w_name, (w.astype(np.float64) * k.reshape(-1, *([1] * (w.ndim - 1)))).astype(w.dtype))
        g.set_initializer(b_name, ((b - mean) * k + bias).astype(w.dtype))
        x = conv.input[0]
        del conv.input[:]
        conv.input.extend([x, w_name, b_name])
        conv.output[0] = bn.output[0]
        fused.append(conv.name)
        drop.add(id(bn))
    if drop:
        keep = [n for n in model.graph.node if id(n) not in drop]
        del model.graph.node[:]
        model.graph.node.extend(keep)
    return fused


def remove_identity(model: onnx.ModelProto, config: PassConfig | None = None) -> list[str]:
    """Drop Identity and (inference-mode) Dropout nodes, rewiring their consumers."""
    g = Graph(model)
    removed: list[str] = []
    rename: dict[str, str] = {}
    keep = []
    for n in model.graph.node:
        if n.op_type in ("Identity", "Dropout") and (config is None or config.selects(n.name)) and n.output[0] not in g.outputs:
            if n.op_type == "Dropout" and len(n.output) > 1 and n.output[1] and g.consumers.get(n.output[1]):
                keep.append(n)
                continue
            rename[n.output[0]] = rename.get(n.input[0], n.input[0])
            removed.append(n.name)
        else:
            keep.append(n)
    if removed:
        for n in keep:
            for i, name in enumerate(n.input):
                if name in rename:
                    n.input[i] = rename[name]
        del model.graph.node[:]
        model.graph.node.extend(keep)
    return removed


def apply(model: onnx.ModelProto, config: Config, calib=None) -> PassOutcome:
    """The cleanup pass: :func:`normalize` with the steps the config enables.

    Args:
        model: a copy of the model (changed in place).
        config: which steps run, and node scoping.
        calib: unused.

    Returns:
        The outcome: every node changed, one note per step that changed something.
    """
    out = PassOutcome(model)
    done = normalize(model, config, constants=config.constants_to_initializers, fold=config.fold_constants,
                     batchnorm=config.fuse_batchnorm, identity=config.remove_identity, outcome=out,
                     control=config.fold_control_flow)
    for key, names in done.items():
        if names:
            out.applied.extend(names)
            out.notes.append(f"{STEPS[key]}: {len(names)}")
    return out
