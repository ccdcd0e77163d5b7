"""Half-precision conversion: fp16 (onnxconverter-common) and bf16.

fp16 converts the graph's float tensors and ops to float16 (TensorRT, Core ML,
GPU providers run it natively), keeping the model's input/output types by
default.  Nodes outside the scope, ops that have no fp16 kernels and nodes with
weights beyond fp16's range stay in float32 behind Cast nodes.

bf16 stores the selected nodes' float weights as bfloat16 with a Cast back to
float32 in front of the node: half the storage, bf16-rounded numerics, and a
graph every runtime loads.  With ``activations=True`` each selected node's
output is also rounded through bfloat16 (Cast pairs), which reproduces bf16
execution numerics on a runtime without bf16 kernels; OpenVINO and TensorRT run
bf16 natively from the float graph with their own precision settings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from . import PassConfig, PassOutcome
from ._util import Graph, ensure_names
from .cleanup import constants_to_initializers

if TYPE_CHECKING:  # pragma: no cover
    import onnx

NEEDS_CALIBRATION = False
FP16_MAX = 65504.0


class Fp16Config(PassConfig):
    keep_io_types: bool = True
    op_block_list: list[str] = []
    min_positive_val: float = 1e-7
    max_finite_val: float = 1e4


class Bf16Config(PassConfig):
    activations: bool = False
    op_types: list[str] | None = None  # None: every node with float weights


CONFIGS = {"fp16": Fp16Config, "bf16": Bf16Config}
Config = Fp16Config


def _fp16(model: onnx.ModelProto, config: Fp16Config) -> PassOutcome:
    import onnx
    from onnxconverter_common import float16

    ensure_names(model)
    constants_to_initializers(model)
    g = Graph(model)
    block: list[str] = []
    out = PassOutcome(model)
    default_blocked = set(float16.DEFAULT_OP_BLOCK_LIST) | set(config.op_block_list)
    for n in model.graph.node:
        if not config.selects(n.name):
            block.append(n.name)
            continue
        if n.op_type in default_blocked:
            block.append(n.name)
            out.skip(n.name, f"{n.op_type} has no fp16 kernels in common runtimes; kept in float32")
            continue
        big = [i for i in n.input if i in g.inits and g.inits[i].data_type == onnx.TensorProto.FLOAT
               and np.abs(g.array(i)).max(initial=0) > FP16_MAX]
        if big:
            block.append(n.name)
            out.skip(n.name, f"weight '{big[0]}' exceeds the fp16 range (|w| > {FP16_MAX:g}); kept in float32")
    converted = float16.convert_float_to_float16(
        model, min_positive_val=config.min_positive_val, max_finite_val=config.max_finite_val,
        keep_io_types=config.keep_io_types, node_block_list=block, op_block_list=list(default_blocked),
        check_fp16_ready=False,
    )
    if config.keep_io_types:
        _restore_float_outputs(converted, {o.name for o in model.graph.output})
    blocked = set(block)
    out.model = converted
    out.applied = [n.name for n in model.graph.node if n.name not in blocked]
    return out


def _restore_float_outputs(model: onnx.ModelProto, float_outputs: set[str]) -> None:
    """onnxconverter-common casts a float32 node's graph output to float16 even with keep_io_types
    when that node is blocked (and so overflows fp16 exactly where the node was kept in fp32):
    make every such output float32 again."""
    from onnx import TensorProto

    producers = {o: n for n in model.graph.node for o in n.output}
    for out in model.graph.output:
        if out.name not in float_outputs:
            continue
        node = producers.get(out.name)
        if node is not None and node.op_type == "Cast":
            for a in node.attribute:
                if a.name == "to" and a.i == TensorProto.FLOAT16:
                    a.i = TensorProto.FLOAT
        out.type.tensor_type.elem_type = TensorProto.FLOAT


def _bf16(model: onnx.ModelProto, config: Bf16Config) -> PassOutcome:
    from onnx import TensorProto, helper

    ensure_names(model)
    constants_to_initializers(model)
    g = Graph(model)
    out = PassOutcome(model)
    new_nodes: list[onnx.NodeProto] = []
    converted: dict[str, str] = {}  # fp32 initializer -> its Cast output
    for n in model.graph.node:
        eligible = config.op_types is None or n.op_type in config.op_types
        float_w = [i for i in n.input if i in g.inits and g.inits[i].data_type == TensorProto.FLOAT]
        if not (eligible and config.selects(n.name)):
            new_nodes.append(n)
            continue
        if float_w:
            for i, name in enumerate(n.input):
                if name not in float_w:
                    continue
                users = g.consumers.get(name, [])
                if any(not config.selects(u.name) for u in users):
                    out.skip(n.name, f"weight '{name}' is shared with a node outside the scope; kept in float32")
                    continue
                if name not in converted:
                    bf_name = g.unique(f"{name}.bf16")
                    t = helper.make_tensor(bf_name, TensorProto.BFLOAT16, list(g.inits[name].dims),
                                           vals=_to_bf16_bits(g.array(name)).tobytes(), raw=True)
                    model.graph.initializer.append(t)
                    cast_out = g.unique(f"{name}.f32")
                    new_nodes.append(helper.make_node("Cast", [bf_name], [cast_out], name=g.unique(f"{n.name}/bf16_cast"),
                                                      to=TensorProto.FLOAT))
                    converted[name] = cast_out
                n.input[i] = converted[name]
        new_nodes.append(n)
        if config.activations and n.output:
            y = n.output[0]
            y_raw = g.unique(f"{y}.pre_bf16")
            n.output[0] = y_raw
            mid = g.unique(f"{y}.bf16")
            new_nodes.append(helper.make_node("Cast", [y_raw], [mid], name=g.unique(f"{n.name}/to_bf16"), to=TensorProto.BFLOAT16))
            new_nodes.append(helper.make_node("Cast", [mid], [y], name=g.unique(f"{n.name}/from_bf16"), to=TensorProto.FLOAT))
        if float_w or config.activations:
            out.applied.append(n.name)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    Graph(model).remove_unused_initializers()
    if config.activations:
        out.notes.append("activations rounded through bfloat16 after every selected node (emulates bf16 execution)")
    return out


def round_fp16(w: np.ndarray, config: Fp16Config | None = None) -> np.ndarray:
    """float32 weights as the fp16 pass stores them (onnxconverter-common's clamping of tiny and huge values, then
    rounding to float16), back in float32.

    Args:
        w: the weights.
        config: supplies ``min_positive_val`` and ``max_finite_val``; None: the fp16 defaults.

    Returns:
        The fp16-rounded weights as a float32 array of the same shape.
    """
    import warnings

    from onnxconverter_common import float16

    config = config or Fp16Config()
    with warnings.catch_warnings():  # it warns once per clamped value
        warnings.simplefilter("ignore", UserWarning)
        return float16.convert_np_to_float16(np.asarray(w, np.float32), config.min_positive_val,
                                             config.max_finite_val).astype(np.float32)


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    rounded[nan] = 0x7FC0
    return rounded


def apply(model: onnx.ModelProto, config: PassConfig, calib=None) -> PassOutcome:
    """Convert the selected nodes to fp16, or store their weights as bf16 (see the module docstring).

    Args:
        model: the model (already a copy); bf16 edits it in place, fp16 returns a converted model.
        config: a :class:`Bf16Config` runs the bf16 conversion; anything else is taken as a :class:`Fp16Config`.
        calib: unused.

    Returns:
        The outcome: the converted model, the nodes converted, and the nodes kept in float32 (with reasons).
    """
    if isinstance(config, Bf16Config):
        return _bf16(model, config)
    return _fp16(model, config)  # type: ignore[arg-type]
