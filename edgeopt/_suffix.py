"""Sensitivity's fast path: run only what a simulated model changed, and what follows it.

A simulator returns the whole model with one layer edited.  Everything before the first edited node computes what
the clean model computes, so those activations come from a run of the clean model (:class:`SuffixRunner` keeps
them, a chunk of layers at a time; as written for a simulation holding QuantizeLinear, whose rounding would turn the
optimized graph's last-bit differences into steps, optimized for the others), the edited span (the *region*) runs as a small model -- without graph
optimizations when it holds QuantizeLinear, as the whole simulated model would -- and the float nodes after it (the
*tail*) run as another, optimized, whose session is shared by every technique that edits the same span.  Anything
this path does not handle makes :meth:`SuffixRunner.run` return None: the caller runs the whole model instead.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import onnx

log = logging.getLogger(__name__)

#: Bytes of reference activations held at once; more and layers are processed in chunks.
BUDGET = 2 << 30
#: Tail sessions kept (techniques on one layer share one).
TAIL_SESSIONS = 4
#: Ops onnxruntime's optimizer rewrites into other numerics: a tail holding one runs as written where the whole
#: simulated model would have (a QDQ simulation).
_QUANT_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
                        "MatMulInteger", "ConvInteger", "MatMulNBits", "QLinearAdd", "QLinearMul", "QGemm"})


class Unsupported(Exception):
    """The simulated model is outside what the fast path handles: run it whole."""


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (5, 10) for a in node.attribute)  # AttributeProto.GRAPH, GRAPHS


def _topo_order(nodes: list[onnx.NodeProto], known: set[str]) -> list[int]:
    """Indices of ``nodes`` in a topological order (their own order where it is one)."""
    avail = set(known)
    for n in nodes:
        if any(i and i not in avail for i in n.input):
            break
        avail.update(n.output)
    else:
        return list(range(len(nodes)))
    import heapq

    producer = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    deps = [0] * len(nodes)
    users: list[list[int]] = [[] for _ in nodes]
    for k, n in enumerate(nodes):
        for p in {producer[i] for i in n.input if i and i not in known and i in producer}:
            deps[k] += 1
            users[p].append(k)
        if any(i and i not in known and i not in producer for i in n.input):
            raise Unsupported(f"node {n.name!r} reads a tensor nothing produces")
    ready = [k for k, d in enumerate(deps) if d == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(k)
        for u in users[k]:
            deps[u] -= 1
            if deps[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise Unsupported("the graph has a cycle")
    return order


def _elem_type(a: np.ndarray) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(a.dtype)


class SuffixRunner:
    """Runs simulated copies of ``clean`` on ``feeds`` from their first edited node on (see the module docstring).

    ``targets`` are the layers measured, in the order they will be; reference activations are captured for a chunk
    of them at a time, within :data:`BUDGET` bytes."""

    def __init__(self, clean: onnx.ModelProto, feeds: dict[str, np.ndarray], targets: list[str],
                 budget: int | None = None) -> None:
        self.clean = clean
        self.feeds = feeds
        self.targets = list(targets)
        self.budget = BUDGET if budget is None else budget
        self.stats: Counter[str] = Counter()
        # reference activations per mode: as the optimized reference computes them, and as the graph computes them
        # written (what the prefix of a QDQ simulation computes: its QuantizeLinear rounds them, 1 ulp can move a step)
        self.caches: dict[bool, dict[str, np.ndarray]] = {True: {}, False: {}}
        self._tails: OrderedDict[tuple, Any] = OrderedDict()
        self._frontiers: dict[str, set[str]] | None = None
        self._sizes: dict[str, int] | None = None
        g = clean.graph
        if not g.output:
            raise Unsupported("no graph output")
        if any(n.op_type == "QuantizeLinear" or _has_subgraph(n) for n in g.node):
            # a QDQ model runs as written whole (the reference runs optimized); subgraphs read outer names
            raise Unsupported("the model holds QuantizeLinear or subgraphs")
        if g.sparse_initializer:
            raise Unsupported("sparse initializers")
        self.out0 = g.output[0].name
        self.inits = {t.name: t for t in g.initializer}
        self._init_bytes: dict[str, bytes] = {}
        self.inputs = {i.name for i in g.input if i.name not in self.inits}
        if self.inputs != set(feeds):
            raise Unsupported("the feeds are not the model's inputs")
        self.batch = self._fixed_batch(g, feeds)
        n = len(next(iter(feeds.values())))
        # the samples as the model takes them: slices of its fixed batch (the last filled up with the first samples,
        # whose outputs are dropped), else all at once; every stage runs slice by slice
        self.slices = ([(np.arange(i, i + self.batch) % n, min(self.batch, n - i)) for i in range(0, n, self.batch)]
                       if self.batch else [(slice(None), n)])
        self.sliced = [{k: v[idx] for k, v in feeds.items()} for idx, _ in self.slices] if self.batch else [feeds]
        self.node_bytes = {n.SerializeToString() for n in g.node}

    @staticmethod
    def _fixed_batch(g, feeds: dict[str, np.ndarray]) -> int | None:
        """The fixed batch the feeds are run in slices of (every input's leading dim fixed to it, the feeds holding
        more samples), or None where the feeds fit the inputs as they are; Unsupported where they fit neither way (a
        per-sample layout's feeds, stacked on a new axis, or any other fixed dim)."""
        batch = None
        for vi in g.input:
            if vi.name not in feeds:
                continue
            dims = [d.dim_value if d.HasField("dim_value") else 0 for d in vi.type.tensor_type.shape.dim]
            shaped = vi.type.tensor_type.HasField("shape")  # a rank-0 input has one; per-sample feeds stack it to [N]
            f = feeds[vi.name]
            if len(dims) not in ((f.ndim,) if shaped else (0, f.ndim)) or any(
                    d > 0 and d != s for d, s in zip(dims[1:], f.shape[1:])):
                raise Unsupported(f"input {vi.name} has fixed dims {dims} the feeds do not fit")
            if dims and dims[0] > 0 and dims[0] != f.shape[0]:
                if batch not in (None, dims[0]):
                    raise Unsupported("inputs fixed to different batches")
                batch = dims[0]
        if batch is not None and any(
                vi.name in feeds and not (vi.type.tensor_type.shape.dim and
                                          vi.type.tensor_type.shape.dim[0].dim_value == batch) for vi in g.input):
            raise Unsupported("inputs fixed to different batches")
        return batch

    # ------------------------------------------------------------------------------------------ reference activations
    def _clean_init_bytes(self, name: str) -> bytes | None:
        if name not in self.inits:
            return None
        b = self._init_bytes.get(name)
        if b is None:
            b = self._init_bytes[name] = self.inits[name].SerializeToString()
        return b

    def _predict(self) -> None:
        """Per target, the tensors crossing the cut just before it in the clean model (what a simulation that edits
        that layer onward reads from the reference), and their estimated sizes."""
        g = self.clean.graph
        nodes = list(g.node)
        order = _topo_order(nodes, set(self.inits) | self.inputs)
        const: set[str] = set(self.inits)
        pos: dict[str, int] = {}
        first: dict[str, int] = {}
        last: dict[str, int] = {}
        for k, idx in enumerate(order):
            n = nodes[idx]
            if all(not i or i in const for i in n.input):
                const.update(n.output)
                continue
            pos.setdefault(n.name, k)
            for i in n.input:
                if i and i not in const and i not in self.inputs:
                    last[i] = k
            for o in n.output:
                if o:
                    first[o] = k
        crossing = [(t, first[t], last[t]) for t in last if t in first]
        self._frontiers = {}
        for name in self.targets:
            p = pos.get(name)
            self._frontiers[name] = set() if p is None else {t for t, a, b in crossing if a < p <= b}
        self._sizes = self._estimate_sizes()

    def _estimate_sizes(self) -> dict[str, int]:
        import onnx

        sizes: dict[str, int] = {}
        try:
            m = onnx.ModelProto()
            m.CopyFrom(self.clean)
            for vi in m.graph.input:
                if vi.name in self.feeds:
                    shape = vi.type.tensor_type.shape
                    del shape.dim[:]
                    for d in self.sliced[0][vi.name].shape:
                        shape.dim.add().dim_value = int(d)
            del m.graph.value_info[:]
            m = onnx.shape_inference.infer_shapes(m)
            for vi in list(m.graph.value_info) + list(m.graph.output):
                tt = vi.type.tensor_type
                if not tt.elem_type or not tt.HasField("shape"):
                    continue
                dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
                if all(d >= 0 for d in dims):  # one slice's, times the slices
                    sizes[vi.name] = int(np.prod(dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(
                        tt.elem_type).itemsize * len(self.sliced)
        except Exception as e:  # noqa: BLE001 - an estimate only
            log.debug("sensitivity fast path: no shape inference (%s)", e)
        return sizes

    def _size(self, name: str) -> int:
        assert self._sizes is not None
        if name in self._sizes:
            return self._sizes[name]
        known = max(self._sizes.values(), default=0)
        return known or 4 * sum(a.nbytes for a in self.feeds.values())

    def _capture(self, names: set[str], optimize: bool) -> dict[str, list[np.ndarray]]:
        """These tensors of the clean model on the feeds (one session; a run per slice): per tensor, its value on
        each slice."""
        import onnx

        from .fidelity import session

        if not names:
            return {}
        m = onnx.ModelProto()
        m.CopyFrom(self.clean)
        have = {o.name for o in m.graph.output}
        wanted = sorted(names)
        m.graph.output.extend([onnx.ValueInfoProto(name=n) for n in wanted if n not in have])
        self.stats["reference runs"] += 1
        sess = session(m, optimize=optimize)
        runs = [sess.run(wanted, feed) for feed in self.sliced]
        return {t: [np.asarray(r[j]) for r in runs] for j, t in enumerate(wanted)}

    def _ensure(self, layer: str, optimize: bool) -> dict[str, list[np.ndarray]]:
        """The reference activations the cut before ``layer`` crosses are held: else capture them for a chunk of
        targets from ``layer`` on, within the budget (dropping the previous chunk's)."""
        if self._frontiers is None:
            self._predict()
        assert self._frontiers is not None
        need = self._frontiers.get(layer, set())
        cache = self.caches[optimize]
        if need <= cache.keys():
            return cache
        budget = self.budget // 2  # per mode
        start = self.targets.index(layer) if layer in self.targets else len(self.targets)
        union = set(need)
        total = sum(self._size(t) for t in union)
        for name in self.targets[start + 1:]:
            extra = self._frontiers[name] - union
            add = sum(self._size(t) for t in extra)
            if total + add > budget:
                break
            union |= extra
            total += add
        cache.clear()  # free the previous chunk before capturing the next
        cache.update(self._capture(union, optimize))
        return cache

    # ------------------------------------------------------------------------------------------ one simulated model
    def run(self, sim: onnx.ModelProto, layer: str, exact: bool) -> np.ndarray | None:
        """The first output of ``sim`` on the feeds, or None where the fast path does not apply (run it whole)."""
        try:
            out = self._run(sim, layer, exact)
        except Exception as e:  # noqa: BLE001 - never a different result or a crash because of the shortcut
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            self.stats[f"fallback ({why})" if isinstance(e, Unsupported) else f"fallback (error {why})"] += 1
            log.debug("sensitivity fast path: %s falls back to the whole model: %s", layer, why)
            return None
        self.stats["fast"] += 1
        return out

    def _run(self, sim: onnx.ModelProto, layer: str, exact: bool) -> np.ndarray:
        import onnx

        from .fidelity import session

        g = sim.graph
        if not g.output or g.output[0].name != self.out0:
            raise Unsupported("the first output differs")
        if g.sparse_initializer:
            raise Unsupported("sparse initializers")
        inits = {t.name: t for t in g.initializer}
        inputs = {i.name for i in g.input if i.name not in inits}
        if inputs != self.inputs:
            raise Unsupported("the graph inputs differ")
        nodes = list(g.node)
        if any(_has_subgraph(n) for n in nodes):
            raise Unsupported("a node holds a subgraph")
        order = _topo_order(nodes, set(inits) | inputs)
        nodes = [nodes[k] for k in order]
        ser = [n.SerializeToString() for n in nodes]

        init_changed: dict[str, bool] = {}

        def changed_init(name: str) -> bool:
            c = init_changed.get(name)
            if c is None:
                c = init_changed[name] = inits[name].SerializeToString() != self._clean_init_bytes(name)
            return c

        const: set[str] = set(inits)  # tensors computed from constants alone
        bad_const: set[str] = set()  # ... of which differ from the clean model's
        is_const = [False] * len(nodes)
        changed = [False] * len(nodes)
        producer: dict[str, int] = {}
        for k, n in enumerate(nodes):
            ins = [i for i in n.input if i]
            c = all(i in const for i in ins)
            ch = ser[k] not in self.node_bytes or any(
                (i in inits and changed_init(i)) or i in bad_const for i in ins)
            is_const[k], changed[k] = c, ch
            for o in n.output:
                if o:
                    producer[o] = k
            if c:
                const.update(o for o in n.output if o)
                if ch:
                    bad_const.update(o for o in n.output if o)
        edited = [k for k in range(len(nodes)) if changed[k] and not is_const[k]]
        if not edited:
            raise Unsupported("no edited node")
        lo, hi = edited[0], edited[-1]
        if self.out0 not in producer or is_const[producer[self.out0]]:
            raise Unsupported("the output is not computed")
        if producer[self.out0] < lo:
            raise Unsupported("the output is produced before the edit")

        def stage(members: list[int], wanted: set[str]) -> tuple[list[int], set[str]]:
            """The members (and constant nodes) needed for ``wanted``, and what they read from outside."""
            need = set(wanted)
            keep: list[int] = []
            for k in reversed(members):
                if any(o in need for o in nodes[k].output):
                    keep.append(k)
                    need.update(i for i in nodes[k].input if i)
            outside = {t for t in need if t not in const} - {o for k in keep for o in nodes[k].output}
            # constant producers of what they read, transitively
            todo = [producer[t] for t in need if t in const and t in producer]
            seen = set(keep)
            while todo:
                k = todo.pop()
                if k in seen:
                    continue
                seen.add(k)
                keep.append(k)
                todo.extend(producer[i] for i in nodes[k].input if i and i in producer)
            return sorted(keep), outside

        region_members = [k for k in range(lo, hi + 1) if not is_const[k]]
        tail_members = [k for k in range(hi + 1, len(nodes)) if not is_const[k]]
        region_out_set = {o for k in region_members for o in nodes[k].output if o}
        if producer[self.out0] > hi:
            tail, tail_in = stage(tail_members, {self.out0})
        else:
            tail, tail_in = [], {self.out0}
        region_out = sorted(tail_in & region_out_set)
        if not region_out:
            raise Unsupported("the edit does not reach the output")
        region, region_in = stage(region_members, set(region_out))
        prefix_out = {o for k in range(lo) if not is_const[k] for o in nodes[k].output if o}
        outside = (region_in | (tail_in - region_out_set)) - inputs
        if not outside <= prefix_out:
            raise Unsupported("a stage reads a tensor from nowhere")

        cache = self._ensure(layer, not exact)
        missing = outside - cache.keys()
        if missing:  # the edit starts before the layer: capture what it reads too
            self.stats["extra captures"] += 1
            cache.update(self._capture(missing, not exact))

        def value(t: str) -> list[np.ndarray]:  # per slice
            return [f[t] for f in self.sliced] if t in inputs else cache[t]

        def model(members: list[int], ins: list[str], types: dict[str, int], outs: list[str],
                  name: str) -> onnx.ModelProto:
            from onnx import helper

            m = onnx.ModelProto()
            m.ir_version = sim.ir_version
            m.opset_import.extend(sim.opset_import)
            m.functions.extend(sim.functions)
            m.graph.name = name
            m.graph.node.extend(nodes[k] for k in members)
            read = {i for k in members for i in nodes[k].input if i in inits}
            m.graph.initializer.extend(inits[i] for i in sorted(read))
            m.graph.input.extend(helper.make_tensor_value_info(i, types[i], None) for i in ins)
            m.graph.output.extend(onnx.ValueInfoProto(name=o) for o in outs)
            return m

        def joined(per_slice: list[np.ndarray]) -> np.ndarray:  # the first output over the samples, filler dropped
            if not self.batch:
                return np.asarray(per_slice[0])
            return np.concatenate([np.asarray(o)[:real] for o, (_, real) in zip(per_slice, self.slices)], axis=0)

        r_in = sorted(region_in)
        r_feed = {t: value(t) for t in r_in}
        r_model = model(region, r_in, {t: _elem_type(a[0]) for t, a in r_feed.items()}, region_out, "region")
        r_sess = session(r_model, optimize=not exact)
        r_runs = [r_sess.run(region_out, {t: a[i] for t, a in r_feed.items()}) for i in range(len(self.sliced))]
        r_vals = {o: [r[j] for r in r_runs] for j, o in enumerate(region_out)}
        if not tail:
            return joined(r_vals[self.out0])

        t_in = sorted(tail_in)
        t_feed = {t: (r_vals[t] if t in r_vals else value(t)) for t in t_in}
        types = {t: _elem_type(np.asarray(a[0])) for t, a in t_feed.items()}
        optimize = not (exact and any(nodes[k].op_type in _QUANT_OPS for k in tail))
        h = hashlib.sha1()
        for k in tail:
            h.update(ser[k])
        h.update(b"".join(f.SerializeToString() for f in sim.functions))
        key = (h.hexdigest(), tuple((t, types[t]) for t in t_in), optimize)
        sess = self._tails.get(key)
        if sess is None:
            self.stats["tail sessions"] += 1
            sess = session(model(tail, t_in, types, [self.out0], "tail"), optimize=optimize)
            self._tails[key] = sess
            while len(self._tails) > TAIL_SESSIONS:
                self._tails.popitem(last=False)
        else:
            self._tails.move_to_end(key)
        return joined([sess.run([self.out0], {t: a[i] for t, a in t_feed.items()})[0] for i in range(len(self.sliced))])
