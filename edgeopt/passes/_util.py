"""Graph-editing helpers shared by the passes."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

import numpy as np

from ..subgraphs import all_graphs

if TYPE_CHECKING:  # pragma: no cover
    import onnx


class Graph:
    """Index over a model's main graph: initializers, producers, consumers, constants."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.refresh()

    def refresh(self) -> None:
        self.inits = {t.name: t for t in self.graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in self.graph.node:
            for o in n.output:
                self.producer[o] = n
            for i in n.input:
                if i:
                    self.consumers[i].append(n)
        self.outputs = {o.name for o in self.graph.output}
        self._names = {n.name for n in self.graph.node} | set(self.inits) | set(self.producer)

    def array(self, name: str) -> np.ndarray | None:
        """Value of an initializer or a Constant node's output, else None."""
        import onnx

        if name in self.inits:
            return onnx.numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return onnx.numpy_helper.to_array(a.t)
        return None

    def set_initializer(self, name: str, value: np.ndarray) -> None:
        """Create or replace an initializer (a tensor consumed elsewhere keeps its name)."""
        import onnx

        t = onnx.numpy_helper.from_array(np.ascontiguousarray(value), name)
        if name in self.inits:
            self.inits[name].CopyFrom(t)
        else:
            self.graph.initializer.append(t)
            self.inits[name] = self.graph.initializer[-1]
        self._names.add(name)

    def unique(self, base: str) -> str:
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def only_consumer(self, tensor: str) -> onnx.NodeProto | None:
        cons = self.consumers.get(tensor, [])
        return cons[0] if len(cons) == 1 and tensor not in self.outputs else None

    def remove_unused_initializers(self) -> None:
        """Drop initializers no node reads, sub-graph nodes included (an If/Loop body may read an outer weight)."""
        used = {i for g in all_graphs(self.graph) for n in g.node for i in n.input} | self.outputs
        keep = [t for t in self.graph.initializer if t.name in used]
        if len(keep) != len(self.graph.initializer):
            del self.graph.initializer[:]
            self.graph.initializer.extend(keep)
        inputs = [i for i in self.graph.input if i.name not in self.inits or i.name in used]
        if len(inputs) != len(self.graph.input):
            del self.graph.input[:]
            self.graph.input.extend(inputs)
        self.refresh()


def output_channel_axis(node: onnx.NodeProto, ndim: int) -> int:
    """The axis of a layer's weight that indexes output channels (what per-channel quantization scales).

    Args:
        node: a Conv, ConvTranspose, Gemm or MatMul.
        ndim: rank of its weight.

    Returns:
        The axis.
    """
    import onnx

    a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1 if ndim > 1 else 0
    if node.op_type == "Gemm":
        return 0 if a.get("transB", 0) else ndim - 1
    return ndim - 1  # MatMul: the output features are the last axis of the right operand


def node_name(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"


def ensure_names(model: onnx.ModelProto) -> None:
    """Give every node a unique name (scoping and reports refer to nodes by name)."""
    seen: set[str] = set()
    for i, n in enumerate(model.graph.node):
        if not n.name or n.name in seen:
            base = n.name or f"{n.op_type}_{i}"
            name, k = base, 0
            while name in seen:
                k += 1
                name = f"{base}_{k}"
            n.name = name
        seen.add(n.name)


def collect_activations(model: onnx.ModelProto, tensors: list[str], data, limit: int | None = None) -> dict[str, np.ndarray]:
    """Values of intermediate ``tensors`` over calibration ``data`` (concatenated along axis 0)."""
    from ..fidelity import session
    from ..graph import expose_outputs

    sess = session(expose_outputs(model, tensors), optimize=False)
    parts: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    for feed in data.batches(limit=limit):
        for t, v in zip(tensors, sess.run(tensors, feed)):
            parts[t].append(v)
    return {t: np.concatenate(v, axis=0) for t, v in parts.items()}
