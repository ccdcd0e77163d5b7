"""Folding static control flow: ``If`` nodes whose condition, and ``Loop`` nodes whose trip count, are known once the
input shapes are (conditions computed from ``Shape``/``Size`` of inputs and constants, as torch.onnx.export writes
``if x.shape[1] > 16:``), inlined into the main graph.

* ``If``: the taken branch's nodes replace the node; values the branch defines are renamed where their names are
  taken already; branch initializers move to the main graph; references to outer-scope values stay as they are.
* ``Loop``: a static trip count of at most :data:`MAX_UNROLL` iterations, a condition that stays true (constant or
  passed through) and no nested sub-graph in the body: the body is unrolled, one renamed copy per iteration; scan
  outputs are stacked (``Unsqueeze`` + ``Concat``).

What stays (a condition or trip count computed from input values) is data-dependent control flow: onnxruntime and
OpenVINO run it, the TFLite/TFLM/Core ML translators refuse it (:func:`edgeopt.backends._ops.check_layers`).

Conditions are evaluated with onnx's reference evaluator (pure Python: no onnxruntime, nothing logged) on the few
nodes that compute them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from ..subgraphs import all_graphs

if TYPE_CHECKING:  # pragma: no cover
    import onnx

#: Ops with sub-graphs (control flow).
CONTROL_OPS = frozenset({"If", "Loop", "Scan"})
#: Loops with a static trip count up to this are unrolled; longer ones stay Loop nodes.
MAX_UNROLL = 16
#: ... and only while the unrolled copies come to at most this many nodes.
MAX_UNROLL_NODES = 4096
#: A condition's computation reads constants of at most this many elements (shape arithmetic, not weights).
_MAX_CONST_ELEMS = 1 << 16


def has_control_flow(model: onnx.ModelProto) -> bool:
    return any(n.op_type in CONTROL_OPS and n.domain in ("", "ai.onnx") for n in model.graph.node)


def _light_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` for shape inference: initializers of more than :data:`_MAX_CONST_ELEMS` elements keep their
    dims and type, not their data (marked external, which inference does not read)."""
    import onnx

    m = onnx.ModelProto(ir_version=model.ir_version)
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    src, g = model.graph, m.graph
    g.name = src.name
    for field in ("node", "input", "output", "value_info"):
        getattr(g, field).extend(getattr(src, field))
    for t in src.initializer:
        if int(np.prod(t.dims, dtype=np.int64)) <= _MAX_CONST_ELEMS or t.data_location == onnx.TensorProto.EXTERNAL:
            g.initializer.append(t)
            continue
        light = g.initializer.add()
        light.name, light.data_type, light.data_location = t.name, t.data_type, onnx.TensorProto.EXTERNAL
        light.dims.extend(t.dims)
        e = light.external_data.add()
        e.key, e.value = "location", "__edgeopt_elided__"
    return m


def _shapes(model: onnx.ModelProto, given: Mapping[str, list[int]] | None) -> dict[str, list[int | None]]:
    """Known dims of the main graph's tensors (None: unknown): ``given`` input shapes, then onnx's lenient shape
    inference on a copy without the data of big weights."""
    import onnx

    work = _light_copy(model)
    for vi in work.graph.input:
        if given and vi.name in given and vi.type.HasField("tensor_type"):
            shp = vi.type.tensor_type.shape
            dims = list(given[vi.name])
            if len(shp.dim) == len(dims):
                for d, v in zip(shp.dim, dims):
                    if v > 0:
                        d.Clear()
                        d.dim_value = int(v)
    try:
        inferred = onnx.shape_inference.infer_shapes(work, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - whatever inference chokes on: the inputs' dims alone
        inferred = work
    out: dict[str, list[int | None]] = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]
    for t in model.graph.initializer:
        out[t.name] = list(t.dims)
    return out


def _static_value(name: str, model: onnx.ModelProto, producers: dict[str, onnx.NodeProto],
                  inits: dict[str, onnx.TensorProto], shapes: dict[str, list[int | None]],
                  used_shapes: set[str]) -> np.ndarray | None:
    """The value of ``name`` when it follows from constants and static shapes alone (None otherwise)."""
    import onnx
    from onnx import numpy_helper

    consts: dict[str, np.ndarray] = {}
    nodes: list[onnx.NodeProto] = []
    seen: set[str] = set()
    reads: set[str] = set()

    def visit(v: str) -> bool:
        if not v or v in seen:
            return True
        seen.add(v)
        if v in inits:
            t = inits[v]
            if t.data_location == onnx.TensorProto.EXTERNAL or int(np.prod(t.dims, dtype=np.int64)) > _MAX_CONST_ELEMS:
                return False
            consts[v] = numpy_helper.to_array(t)
            return True
        n = producers.get(v)
        if n is None or n.domain not in ("", "ai.onnx") or n.op_type.startswith("Random"):
            return False
        if any(a.HasField("g") or a.graphs for a in n.attribute):
            return False
        if n.op_type in ("Shape", "Size"):
            dims = shapes.get(n.input[0])
            if dims is not None:
                start = next((a.i for a in n.attribute if a.name == "start"), 0)
                end = next((a.i for a in n.attribute if a.name == "end"), None)
                part = dims[start:end] if n.op_type == "Shape" else dims
                if all(d is not None for d in part):
                    consts[n.output[0]] = (np.array(part, np.int64) if n.op_type == "Shape"
                                           else np.array(int(np.prod(part, dtype=np.int64)), np.int64))
                    if n.input[0] not in inits:
                        reads.add(n.input[0])
                    return True
            if n.input[0] not in inits and n.input[0] not in producers:
                return False  # the Shape of a graph input of unknown dims
        if not all(visit(i) for i in n.input):
            return False
        if id(n) not in {id(x) for x in nodes}:
            nodes.append(n)
        return True

    if not visit(name):
        return None
    if name in consts:
        value = consts[name]
    else:
        from onnx import helper
        from onnx.reference import ReferenceEvaluator

        g = helper.make_graph(nodes, "cond", [], [helper.make_value_info(name, onnx.TypeProto())],
                              initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()])
        m = helper.make_model(g, opset_imports=list(model.opset_import))
        m.ir_version = model.ir_version
        try:
            value = np.asarray(ReferenceEvaluator(m).run([name], {})[0])
        except Exception:  # noqa: BLE001 - an op the reference evaluator lacks: not static to us
            return None
    used_shapes.update(reads)
    return value


class _Names:
    """Value and node names of a model (all scopes) for picking fresh ones; :meth:`scope` gives the value names an
    inlined sub-graph of one node must not reuse (everything but that node's own sub-graphs)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.main: set[str] = {v.name for v in [*g.input, *g.output, *g.value_info]} | {t.name for t in g.initializer}
        self.main.update(o for n in g.node for o in n.output)
        self.main_nodes: set[str] = {n.name for n in g.node}
        self.sub: dict[int, set[str]] = {}
        self.sub_nodes: dict[int, set[str]] = {}
        for n in g.node:
            own: set[str] = set()
            own_nodes: set[str] = set()
            for a in n.attribute:
                for sg in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    for s in all_graphs(sg):
                        own.update(v.name for v in [*s.input, *s.output, *s.value_info])
                        own.update(t.name for t in s.initializer)
                        own.update(o for m in s.node for o in m.output)
                        own_nodes.update(m.name for m in s.node)
            if own:
                self.sub[id(n)] = own
                self.sub_nodes[id(n)] = own_nodes
        self.values = set(self.main)
        self.nodes = set(self.main_nodes)

    def scope(self, node: onnx.NodeProto) -> None:
        """Make :attr:`values` the names taken outside ``node``'s sub-graphs."""
        self.values = set(self.main).union(*(v for k, v in self.sub.items() if k != id(node)))
        self.nodes = set(self.main_nodes).union(*(v for k, v in self.sub_nodes.items() if k != id(node)))

    def fresh(self, base: str, pool: set[str]) -> str:
        name, k = base, 1
        while name in pool:
            name, k = f"{base}_{k}", k + 1
        pool.add(name)
        if pool is self.values:
            self.main.add(name)
        elif pool is self.nodes:
            self.main_nodes.add(name)
        return name


def _rename_refs(graph: onnx.GraphProto, rename: Mapping[str, str]) -> None:
    """Rename the references to (and the definitions of) values in ``graph`` and its sub-graphs."""
    for n in graph.node:
        for i, v in enumerate(n.input):
            if v in rename:
                n.input[i] = rename[v]
        for i, v in enumerate(n.output):
            if v in rename:
                n.output[i] = rename[v]
        for a in n.attribute:
            if a.HasField("g"):
                _rename_refs(a.g, rename)
            for sg in a.graphs:
                _rename_refs(sg, rename)
    for vi in [*graph.output, *graph.value_info]:
        if vi.name in rename:
            vi.name = rename[vi.name]
    for t in graph.initializer:
        if t.name in rename:
            t.name = rename[t.name]


def _inline(model: onnx.ModelProto, body: onnx.GraphProto, bind: Mapping[str, str], outputs: list[tuple[str, str]],
            names: _Names, prefix: str, always_rename: bool) -> list[onnx.NodeProto]:
    """Copies of ``body``'s nodes for the main graph: its inputs bound to main-graph values (``bind``), the values it
    defines renamed (where taken, or always), its initializers added to the main graph; ``outputs`` pairs (body
    output, main-graph name) become those names (directly, or through an Identity)."""
    import onnx
    from onnx import helper

    b = onnx.GraphProto()
    b.CopyFrom(body)
    defined = [o for n in b.node for o in n.output if o] + [t.name for t in b.initializer]
    produced = {o for n in b.node for o in n.output if o}
    rename: dict[str, str] = dict(bind)
    targets: dict[str, str] = {}
    for bo, dst in outputs:
        if dst and bo in produced and bo not in targets and bo not in bind:
            targets[bo] = dst
    for v in defined:
        if v in targets:
            rename[v] = targets[v]
        elif always_rename or v in names.values:
            rename[v] = names.fresh(f"{prefix}/{v.lstrip('/')}" if always_rename else v, names.values)
        else:
            names.values.add(v)
            names.main.add(v)
    _rename_refs(b, rename)
    for t in b.initializer:
        model.graph.initializer.append(t)
    for vi in b.value_info:
        if vi.name not in {o for o in targets.values()}:
            model.graph.value_info.append(vi)
    nodes = list(b.node)
    for n in nodes:
        n.name = names.fresh(n.name if n.name and not always_rename else f"{prefix}/{(n.name or n.op_type).lstrip('/')}",
                             names.nodes)
    for bo, dst in outputs:
        if dst and targets.get(bo) != dst:
            nodes.append(helper.make_node("Identity", [rename.get(bo, bo)], [dst],
                                          name=names.fresh(f"{prefix}/{dst}_out", names.nodes)))
    return nodes


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _unroll(model: onnx.ModelProto, node: onnx.NodeProto, trips: int, names: _Names,
            outer_value) -> list[onnx.NodeProto] | None:
    """``node`` (a Loop) unrolled ``trips`` times, or None when its body is not one that unrolls plainly."""
    from onnx import helper, numpy_helper

    body = next(a.g for a in node.attribute if a.name == "body")
    n_carried = len(node.input) - 2
    n_scan = len(body.output) - 1 - n_carried
    if n_carried < 0 or n_scan < 0 or len(body.input) != 2 + n_carried:
        return None
    if any(a.HasField("g") or a.graphs for n in body.node for a in n.attribute):
        return None
    if (trips == 0 and n_scan) or trips * len(body.node) > MAX_UNROLL_NODES:
        return None
    cond_in, cond_out = body.input[1].name, body.output[0].name
    const_true = {t.name for t in body.initializer if t.data_type == 9 and numpy_helper.to_array(t).all()}
    for n in body.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].HasField("t") and n.attribute[0].t.data_type == 9:
            if numpy_helper.to_array(n.attribute[0].t).all():
                const_true.add(n.output[0])
    identity = {n.output[0]: n.input[0] for n in body.node if n.op_type == "Identity"}
    defined = {o for n in body.node for o in n.output} | {t.name for t in body.initializer}
    v, hops = cond_out, 0
    while v in identity and hops < len(body.node):  # the condition passed on, or a constant true, in or outside
        v, hops = identity[v], hops + 1
    if v != cond_in and v not in const_true:
        outer = outer_value(v) if v not in defined else None
        if outer is None or not outer.all():
            return None
    prefix = node.name or "Loop"
    true_name = names.fresh(f"{prefix}/true", names.values)
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), true_name))
    carried = list(node.input[2:])
    scans: list[list[str]] = [[] for _ in range(n_scan)]
    nodes: list[onnx.NodeProto] = []
    for it in range(trips):
        it_name = names.fresh(f"{prefix}/iter{it}", names.values)
        model.graph.initializer.append(numpy_helper.from_array(np.array(it, np.int64), it_name))
        bind = {body.input[0].name: it_name, cond_in: true_name}
        bind.update({body.input[2 + k].name: carried[k] for k in range(n_carried)})
        outs = [(o.name, names.fresh(f"{prefix}/it{it}/{o.name}", names.values)) for o in body.output[1:]]
        nodes += _inline(model, body, bind, outs, names, f"{prefix}/it{it}", always_rename=True)
        carried = [dst for _, dst in outs[:n_carried]]
        for k in range(n_scan):
            scans[k].append(outs[n_carried + k][1])
    for k, dst in enumerate(node.output[:n_carried]):
        if dst:
            nodes.append(helper.make_node("Identity", [carried[k]], [dst], name=names.fresh(f"{prefix}/{dst}_out", names.nodes)))
    axes_name = None
    if _opset(model) >= 13:
        axes_name = names.fresh(f"{prefix}/axes0", names.values)
        model.graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), axes_name))
    for k, dst in enumerate(node.output[n_carried:]):
        if not dst:
            continue
        parts = []
        for v in scans[k]:
            u = names.fresh(f"{v}_unsqueezed", names.values)
            kw = {} if axes_name else {"axes": [0]}
            nodes.append(helper.make_node("Unsqueeze", [v, axes_name] if axes_name else [v], [u],
                                          name=names.fresh(f"{prefix}/{u}", names.nodes), **kw))
            parts.append(u)
        nodes.append(helper.make_node("Concat", parts, [dst], axis=0, name=names.fresh(f"{prefix}/{dst}_concat", names.nodes)))
    return nodes


def _fold_constants(model: onnx.ModelProto, nodes: list[onnx.NodeProto], producers: dict[str, onnx.NodeProto],
                    inits: dict[str, onnx.TensorProto], shapes: dict[str, list[int | None]]) -> list[onnx.NodeProto]:
    """``nodes`` (just inlined) with the small computations on constants among them (``Unsqueeze`` of a ``Constant``:
    the starts and ends of torch's ``Slice``) replaced by initializers, so that shape inference sees through them."""
    from onnx import numpy_helper

    for t in model.graph.initializer:
        inits.setdefault(t.name, t)
    for n in nodes:
        for o in n.output:
            producers[o] = n
    keep = []
    for n in nodes:
        if n.op_type != "Constant" and n.input and len(n.output) == 1 and n.output[0] \
                and all(not i or i in inits or (i in producers and producers[i].op_type == "Constant") for i in n.input):
            v = _static_value(n.output[0], model, producers, inits, shapes, set())
            if v is not None and v.size <= _MAX_CONST_ELEMS:
                t = numpy_helper.from_array(np.asarray(v), n.output[0])
                model.graph.initializer.append(t)
                inits[t.name] = t
                producers.pop(n.output[0], None)
                continue
        keep.append(n)
    return keep


def _remove_dead(model: onnx.ModelProto) -> None:
    """Drop main-graph nodes whose outputs nothing reads (no side effects in ONNX)."""
    while True:
        used = {o.name for o in model.graph.output}
        for g in all_graphs(model.graph):
            for n in g.node:
                used.update(n.input)
            if g is not model.graph:
                used.update(o.name for o in g.output)
        keep = [n for n in model.graph.node if any(o in used for o in n.output if o)]
        if len(keep) == len(model.graph.node):
            return
        del model.graph.node[:]
        model.graph.node.extend(keep)


def fold_control_flow(model: onnx.ModelProto, input_shapes: Mapping[str, list[int]] | None = None, *,
                      rounds: int = 8, pin: bool = True) -> list[str]:
    """Inline the main graph's ``If`` nodes whose condition is static, and unroll its ``Loop`` nodes of a static
    trip count up to :data:`MAX_UNROLL`, in place; up to ``rounds`` rounds (a folded branch can hold control flow that
    is static in turn).

    Args:
        model: changed in place.
        input_shapes: input shapes to fold with, beyond the static dims of the model's inputs.
        pin: set those dims of inputs whose shape a folded condition read in the model's inputs (the folded model is
            only right for them).

    Returns:
        The names of the nodes folded.
    """
    if not has_control_flow(model):
        return []
    folded: list[str] = []
    read: set[str] = set()
    for _ in range(rounds):
        shapes = _shapes(model, input_shapes)
        producers = {o: n for n in model.graph.node for o in n.output if o}
        for n in model.graph.node:
            if n.op_type == "Constant":
                for o in n.output:
                    producers[o] = n
        inits = {t.name: t for t in model.graph.initializer}
        names = _Names(model)
        new_nodes: list[onnx.NodeProto] = []
        changed = False
        for n in model.graph.node:
            if n.op_type not in ("If", "Loop") or n.domain not in ("", "ai.onnx"):
                new_nodes.append(n)
                continue
            got = None
            names.scope(n)
            if n.op_type == "If":
                c = _static_value(n.input[0], model, producers, inits, shapes, read)
                if c is not None and c.size == 1:
                    branch = next(a.g for a in n.attribute if a.name == ("then_branch" if bool(c.reshape(-1)[0]) else "else_branch"))
                    got = _inline(model, branch, {}, list(zip([o.name for o in branch.output], n.output)), names,
                                  n.name or "If", always_rename=False)
            else:
                m = _static_value(n.input[0], model, producers, inits, shapes, read) if n.input[0] else None
                c = _static_value(n.input[1], model, producers, inits, shapes, read) if len(n.input) > 1 and n.input[1] else np.array(True)
                if m is not None and m.size == 1 and c is not None and c.size == 1 and bool(c.reshape(-1)[0]) \
                        and 0 <= int(m.reshape(-1)[0]) <= MAX_UNROLL:
                    outer = functools.partial(_static_value, model=model, producers=producers, inits=inits,
                                              shapes=shapes, used_shapes=read)
                    got = _unroll(model, n, int(m.reshape(-1)[0]), names, outer)
            if got is None:
                new_nodes.append(n)
                continue
            folded.append(n.name or n.op_type)
            new_nodes.extend(_fold_constants(model, got, producers, inits, shapes))
            changed = True
        if not changed:
            break
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
        _remove_dead(model)
    if pin and folded and input_shapes:
        for vi in model.graph.input:
            if vi.name in read and vi.name in input_shapes and vi.type.HasField("tensor_type"):
                dims = vi.type.tensor_type.shape.dim
                if len(dims) == len(input_shapes[vi.name]):
                    for d, v in zip(dims, input_shapes[vi.name]):
                        if v > 0 and not (d.HasField("dim_value") and d.dim_value == v):
                            d.Clear()
                            d.dim_value = int(v)
    if folded:
        used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        for g in all_graphs(model.graph):
            if g is not model.graph:
                used.update(i for n in g.node for i in n.input)
                used.update(o.name for o in g.output)  # a branch returning an outer initializer as it is
        keep = [t for t in model.graph.initializer if t.name in used or t.name in {i.name for i in model.graph.input}]
        if len(keep) != len(model.graph.initializer):
            del model.graph.initializer[:]
            model.graph.initializer.extend(keep)
    return folded
