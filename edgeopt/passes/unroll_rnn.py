"""Unroll ONNX ``GRU`` and ``LSTM`` nodes into the plain ops every backend translates (MatMul, Add, Sigmoid, Tanh,
Mul, Sub, Slice, Reshape, Concat): what a runtime without recurrent kernels (the TFLite writer, TFLite Micro, the
Core ML translator) runs instead, as TensorFlow's converter does for Keras RNNs without a fused kernel.

Exact up to float summation order (the tests compare with onnxruntime's GRU/LSTM kernels).  Needs a static sequence
length and batch (the analysed input shapes give them); the input projection of all steps is one MatMul, each step
one MatMul with the recurrent weights.  Supported: layout 0, forward / reverse / bidirectional, default activations,
``linear_before_reset`` 0 and 1 (GRU), initial states given or zero, the three (two) outputs.  Refused with a
reason (:func:`why_not`): ``sequence_lens``, peepholes, ``clip``, ``input_forget``, other activations, layout 1.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

RNN_OPS = ("GRU", "LSTM")
#: most inputs one Concat of the unrolled outputs takes (TFLite Micro's CONCATENATION accepts at most 10)
MAX_CONCAT = 8
_DEFAULT_ACTS = {"GRU": [b"Sigmoid", b"Tanh"], "LSTM": [b"Sigmoid", b"Tanh", b"Tanh"]}


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def why_not(node: onnx.NodeProto, x_shape: list[int] | None) -> str | None:
    """Why ``node`` (GRU/LSTM) cannot be unrolled (None: it can); ``x_shape``: its input X's static shape."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return why_not_layer(node.op_type, attrs, list(node.input), x_shape)


def why_not_layer(op_type: str, attrs: dict, inputs: list[str], x_shape: list[int] | None) -> str | None:
    """:func:`why_not` from a layer's op type, attributes, input names and X's shape (what analysis records: the
    pre-flight of backends that run the unrolled form asks this)."""
    inputs = list(inputs) + [""] * 8
    if int(attrs.get("layout", 0)) != 0:
        return "layout=1 (batch-first) is not unrolled; export with layout 0"
    if inputs[4]:
        return "sequence_lens (per-sample lengths) is not unrolled; pad to one length"
    if op_type == "LSTM" and inputs[7]:
        return "peephole weights (P) are not unrolled"
    if attrs.get("clip") is not None:
        return "clip is not unrolled"
    if op_type == "LSTM" and int(attrs.get("input_forget", 0)):
        return "input_forget is not unrolled"
    acts = attrs.get("activations")
    if acts is not None:
        n_dir = 2 if attrs.get("direction", b"forward") in (b"bidirectional", "bidirectional") else 1
        if [a if isinstance(a, bytes) else str(a).encode() for a in acts] != _DEFAULT_ACTS[op_type] * n_dir:
            return f"activations {acts} are not the defaults"
    if x_shape is None or len(x_shape) != 3 or any(not isinstance(d, int) or d <= 0 for d in x_shape):
        return "its sequence length and batch are not static (give --input-shape)"
    return None


class _Builder:
    def __init__(self, prefix: str):
        self.prefix, self.nodes, self.inits, self.n = prefix, [], [], 0

    def name(self, what: str) -> str:
        self.n += 1
        return f"{self.prefix}/{what}_{self.n}"

    def const(self, what: str, value: np.ndarray) -> str:
        name = self.name(what)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], what: str | None = None, **attrs) -> str:
        out = self.name(what or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def slice(self, x: str, axis: int, start: int, end: int) -> str:
        return self.op("Slice", [x, self.const("starts", np.array([start], np.int64)),
                                 self.const("ends", np.array([end], np.int64)),
                                 self.const("axes", np.array([axis], np.int64))])

    def concat(self, parts: list[str], axis: int) -> str:
        """Concat in a tree of at most :data:`MAX_CONCAT` inputs per node (TFLite Micro's CONCATENATION takes 10)."""
        while len(parts) > MAX_CONCAT:
            parts = [self.op("Concat", parts[i : i + MAX_CONCAT], axis=axis) if len(parts[i : i + MAX_CONCAT]) > 1
                     else parts[i] for i in range(0, len(parts), MAX_CONCAT)]
        return parts[0] if len(parts) == 1 else self.op("Concat", parts, axis=axis)

    def reshape(self, x: str, shape: list[int]) -> str:
        return self.op("Reshape", [x, self.const("shape", np.array(shape, np.int64))])


def _weights(model_inits: dict[str, np.ndarray], name: str) -> np.ndarray | None:
    return model_inits.get(name) if name else None


def _state(b: _Builder, given: str, d: int, batch: int, hidden: int, what: str) -> str:
    """Direction ``d``'s initial state [batch, hidden]: a slice of the given one, or zeros."""
    if given:
        return b.reshape(b.slice(given, 0, d, d + 1), [batch, hidden])
    return b.const(what, np.zeros((batch, hidden), np.float32))


def _unroll(node: onnx.NodeProto, x_shape: list[int], inits: dict[str, np.ndarray]) -> tuple[list, list]:
    gru = node.op_type == "GRU"
    g = 3 if gru else 4
    seq, batch, _ = x_shape
    inputs = list(node.input) + [""] * 8
    W, R = inits[inputs[1]], inits[inputs[2]]  # [dirs, g*H, I], [dirs, g*H, H]
    dirs, hidden = W.shape[0], R.shape[2]
    B = _weights(inits, inputs[3])
    if B is None:
        B = np.zeros((dirs, 2 * g * hidden), np.float32)
    lbr = int(_attr(node, "linear_before_reset", 0)) if gru else 0
    direction = _attr(node, "direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    b = _Builder(node.name or f"{node.op_type}_{node.output[0]}")
    x = inputs[0]
    outs = list(node.output) + ["", "", ""]
    ys, hs, cs = [], [], []
    for d in range(dirs):
        reverse = direction == "reverse" or (direction == "bidirectional" and d == 1)
        H = hidden
        wb, rb = B[d, : g * H], B[d, g * H :]
        # every step's input projection at once: [S, B, I] x [I, gH] + Wb (+ Rb where it simply adds)
        add_rb = rb.copy()
        if gru:
            add_rb[2 * H :] = 0  # h's Rb sits inside the reset gate's product (lbr=1) or after it (lbr=0)
        xw = b.op("MatMul", [x, b.const("W_T", np.ascontiguousarray(W[d].T))])
        xw = b.op("Add", [xw, b.const("bias", (wb + add_rb).astype(np.float32))])
        h = _state(b, inputs[5], d, batch, H, "h0")
        c = _state(b, inputs[6], d, batch, H, "c0") if not gru else None
        steps = range(seq - 1, -1, -1) if reverse else range(seq)
        y_steps: dict[int, str] = {}
        if gru:
            r_zr = b.const("R_zr_T", np.ascontiguousarray(R[d, : 2 * H].T))
            r_h = b.const("R_h_T", np.ascontiguousarray(R[d, 2 * H :].T))
            rb_h = b.const("Rb_h", rb[2 * H :].astype(np.float32))
        else:
            r_all = b.const("R_T", np.ascontiguousarray(R[d].T))
        for t in steps:
            xt = b.reshape(b.slice(xw, 0, t, t + 1), [batch, g * H])
            if gru:
                pre_zr = b.op("Add", [b.slice(xt, 1, 0, 2 * H), b.op("MatMul", [h, r_zr])])
                zr = b.op("Sigmoid", [pre_zr])
                z, r = b.slice(zr, 1, 0, H), b.slice(zr, 1, H, 2 * H)
                if lbr:
                    hr = b.op("Add", [b.op("MatMul", [h, r_h]), rb_h])
                    cand = b.op("Add", [b.slice(xt, 1, 2 * H, 3 * H), b.op("Mul", [r, hr])])
                else:
                    rh = b.op("MatMul", [b.op("Mul", [r, h]), r_h])
                    cand = b.op("Add", [b.slice(xt, 1, 2 * H, 3 * H), b.op("Add", [rh, rb_h])])
                ht = b.op("Tanh", [cand])
                h = b.op("Add", [ht, b.op("Mul", [z, b.op("Sub", [h, ht])])])  # (1 - z) * h~ + z * h
            else:
                gates = b.op("Add", [xt, b.op("MatMul", [h, r_all])])
                i = b.op("Sigmoid", [b.slice(gates, 1, 0, H)])
                o = b.op("Sigmoid", [b.slice(gates, 1, H, 2 * H)])
                f = b.op("Sigmoid", [b.slice(gates, 1, 2 * H, 3 * H)])
                cc = b.op("Tanh", [b.slice(gates, 1, 3 * H, 4 * H)])
                c = b.op("Add", [b.op("Mul", [f, c]), b.op("Mul", [i, cc])])
                h = b.op("Mul", [o, b.op("Tanh", [c])])
            y_steps[t] = h
        if outs[0]:
            ys.append(b.concat([b.reshape(y_steps[t], [1, 1, batch, H]) for t in range(seq)], axis=0))
        hs.append(b.reshape(h, [1, batch, H]))
        if c is not None:
            cs.append(b.reshape(c, [1, batch, H]))

    def emit(parts: list[str], out: str, axis: int) -> None:
        if not out:
            return
        src = parts[0] if len(parts) == 1 else b.op("Concat", parts, axis=axis)
        b.nodes.append(helper.make_node("Identity", [src], [out], name=f"{b.prefix}/{out}"))

    emit(ys, outs[0], 1)
    emit(hs, outs[1], 0)
    if not gru:
        emit(cs, outs[2], 0)
    return b.nodes, b.inits


def _input_shapes(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None) -> dict[str, list[int]]:
    from onnx import shape_inference

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for i in m.graph.input:
        if input_shapes and i.name in input_shapes:
            dims = i.type.tensor_type.shape.dim
            for d, v in zip(dims, input_shapes[i.name]):
                d.Clear()
                d.dim_value = int(v)
    try:
        m = shape_inference.infer_shapes(m)
    except Exception:  # noqa: BLE001 - shapes unknown: nodes are left as they are
        pass
    shapes = {}
    for vi in list(m.graph.input) + list(m.graph.value_info) + list(m.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
    return shapes


def unroll_rnns(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` with every unrollable GRU/LSTM node (constant weights, see :func:`why_not`) replaced by
    plain ops; returns it and one note per node left as it was (with the reason)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    for n in out.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            inits[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    shapes = _input_shapes(out, input_shapes)
    nodes, new_inits, notes = [], [], []
    for node in out.graph.node:
        if node.op_type not in RNN_OPS or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        ins = list(node.input) + [""] * 8
        why = why_not(node, shapes.get(node.input[0]))
        if why is None and not (ins[1] in inits and ins[2] in inits and (not ins[3] or ins[3] in inits)):
            why = "its weights are not constant"
        if why is not None:
            notes.append(f"{node.op_type} '{node.name}' kept: {why}")
            nodes.append(node)
            continue
        unrolled, created = _unroll(node, shapes[node.input[0]], inits)
        nodes.extend(unrolled)
        new_inits.extend(created)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(new_inits)
    return out, notes
