"""The built-in techniques (registered by :data:`edgeopt.technique.BUILTIN`) and the graph helpers their
simulators share: a copy of the model with one layer edited, nodes inserted in topological position."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..technique import WEIGHTED, NotApplicable, SimContext

if TYPE_CHECKING:  # pragma: no cover
    import onnx

    from ..passes._util import Graph


def layer_copy(ctx: SimContext, layer: str) -> tuple[onnx.ModelProto, Graph, onnx.NodeProto, np.ndarray]:
    """(copy of the model, its graph index, the layer's node in the copy, the layer's constant weight)."""
    import onnx

    from ..passes._util import Graph

    m = onnx.ModelProto()
    m.CopyFrom(ctx.model)
    g = Graph(m)
    node = next((n for n in m.graph.node if n.name == layer), None)
    if node is None:
        raise NotApplicable(f"{layer}: no such layer")
    if node.op_type not in WEIGHTED or len(node.input) < 2:
        raise NotApplicable(f"{layer}: a {node.op_type} has no weight to compress")
    w = g.array(node.input[1])
    if w is None:
        raise NotApplicable(f"{layer}: weight is not constant")
    return m, g, node, w


def insert_after(model: onnx.ModelProto, node: onnx.NodeProto, new: list[onnx.NodeProto]) -> None:
    """Insert ``new`` right after ``node`` (keeps the node list topologically sorted)."""
    at = list(model.graph.node).index(node) + 1
    for k, n in enumerate(new):
        model.graph.node.insert(at + k, n)


def insert_before(model: onnx.ModelProto, node: onnx.NodeProto, new: list[onnx.NodeProto]) -> None:
    at = list(model.graph.node).index(node)
    for k, n in enumerate(new):
        model.graph.node.insert(at + k, n)


def round_output(model: onnx.ModelProto, node: onnx.NodeProto, to: int) -> None:
    """Route ``node``'s first output through a Cast to ``to`` (an onnx TensorProto type) and back to float32."""
    from onnx import TensorProto, helper

    y, tag = node.output[0], f"{node.name}/sim"
    node.output[0] = f"{tag}/raw"
    insert_after(model, node, [helper.make_node("Cast", [f"{tag}/raw"], [f"{tag}/mid"], name=f"{tag}/c1", to=to),
                               helper.make_node("Cast", [f"{tag}/mid"], [y], name=f"{tag}/c2", to=TensorProto.FLOAT)])


def qdq_nodes(model: onnx.ModelProto, tensor: str, out: str, scale: np.ndarray, zero: np.ndarray,
              tag: str) -> list[onnx.NodeProto]:
    """QuantizeLinear -> DequantizeLinear from ``tensor`` to ``out`` (their parameters become initializers)."""
    from onnx import helper, numpy_helper

    s, z = f"{tag}/scale", f"{tag}/zp"
    model.graph.initializer.extend([numpy_helper.from_array(np.asarray(scale), s), numpy_helper.from_array(np.asarray(zero), z)])
    return [helper.make_node("QuantizeLinear", [tensor, s, z], [f"{tag}/q"], name=f"{tag}/Q"),
            helper.make_node("DequantizeLinear", [f"{tag}/q", s, z], [out], name=f"{tag}/DQ")]


def scoped_pass(ctx: SimContext, pass_name: str, layer: str, config: dict, calib=None) -> onnx.ModelProto:
    """Run a pass on a copy of the model scoped to one layer; :class:`NotApplicable` with the pass's reason when it
    left the layer alone."""
    from ..passes import run_pass

    res = run_pass(pass_name, ctx.model, {**config, "nodes": [layer]}, calib, evaluate=False)
    if layer not in res.report.applied:
        why = next((s.reason for s in res.report.skipped if s.node == layer), f"{pass_name} does not apply")
        raise NotApplicable(why)
    return res.model
