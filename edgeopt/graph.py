"""Loading and analysing ONNX models: per-layer parameters, MACs, weight bytes,
activation sizes, tensor lifetimes and arena planning.

Only ``onnx`` and ``numpy`` are needed.  Weights may be initializers, ``Constant``
nodes (PaddlePaddle exports) or external-data files; sub-graphs of constants
(``DequantizeLinear`` of int8 weights, ``Shape``->``Gather`` chains on static
shapes) are folded for the analysis, so they count as weights, not as layers.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InputShapeError, ModelLoadError
from .memory import MemoryLimitError, limit_hint, max_memory
from .types import LayerInfo, ModelAnalysis, TensorInfo
from .units import fmt_bytes

if TYPE_CHECKING:  # pragma: no cover
    import onnx

# --------------------------------------------------------------------------- loading

_MAGIC: list[tuple[int, bytes, str]] = [
    (4, b"TFL3", "a TFLite flatbuffer (.tflite)"),
    (0, b"PK\x03\x04", "a zip archive (a PyTorch .pt/.pth checkpoint, a .mlmodel package or a Keras file)"),
    (0, b"\x89HDF", "an HDF5 file (a Keras .h5 model)"),
    (0, b"\x80\x02", "a Python pickle (a PyTorch checkpoint)"),
    (0, b"GGUF", "a GGUF file"),
    (0, b"<?xml", "an XML file (an OpenVINO IR .xml?)"),
]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _sniff(path: Path) -> str | None:
    with open(path, "rb") as f:
        head = f.read(16)
    for off, magic, what in _MAGIC:
        if head[off : off + len(magic)] == magic:
            return what
    if head[:1] == b"{":
        return "a JSON file"
    return None


def _first_line(e: BaseException) -> str:
    text = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "") or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def load_model(path: str | Path, *, load_external_data: bool = False) -> onnx.ModelProto:
    """Load an ONNX model, turning every way a file can be wrong into a one-line :class:`ModelLoadError`.

    Everything is checked before anything big is read: opset versions against what the installed onnx and
    onnxruntime support, every tensor's data type and data size against its dims (initializers, ``Constant``
    values, sub-graphs), external-data references (numeric, non-negative offsets and lengths inside files beside the
    model), that every tensor a node reads is defined before it, unique tensor names, graph outputs that exist and
    graph inputs/outputs of types edgeopt can feed.  Sparse initializers (and ``Constant`` sparse values) are turned
    dense; duplicate node names get a suffix (onnxruntime refuses them).  External data is only checked unless
    ``load_external_data`` is set, so a multi-GB model analyses without reading its weights; what is read must fit
    :func:`max_memory` (:class:`MemoryLimitError` otherwise).
    """
    import onnx
    from google.protobuf.message import DecodeError

    p = Path(path)
    if p.is_dir():
        hint = " (a SavedModel or .mlpackage directory?)" if (p / "saved_model.pb").exists() or p.suffix == ".mlpackage" else ""
        raise ModelLoadError(f"{p} is a directory, not an ONNX model file{hint}")
    if not p.exists():
        raise ModelLoadError(f"model file {p} does not exist")
    try:
        size = p.stat().st_size
        if size == 0:
            raise ModelLoadError(f"model file {p} is empty")
        what = _sniff(p)
    except OSError as e:
        raise ModelLoadError(f"cannot read model file {p}: {e.strerror or e}") from e
    if what:
        raise ModelLoadError(f"{p} is {what}, not an ONNX model; edgeopt takes ONNX input (export to .onnx first)")
    limit = max_memory()
    if size > limit:
        raise MemoryLimitError(f"model file {p} is {fmt_bytes(size)}, more than the memory limit of {fmt_bytes(limit)}; "
                               f"{limit_hint()}")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except DecodeError as e:
        raise ModelLoadError(f"{p} is not a valid ONNX model: protobuf parse failed ({e}); the file is truncated, corrupt or not ONNX") from e
    except Exception as e:  # onnx raises several types on junk
        raise ModelLoadError(f"{p} is not a valid ONNX model: {_first_line(e)}") from e
    if model.ir_version <= 0 or not model.opset_import or not model.graph.node:
        raise ModelLoadError(f"{p} does not hold an ONNX graph (no IR version, opset or nodes): truncated, corrupt or not ONNX")
    _check_text(p, "the model", model.producer_name, model.producer_version, model.domain,
                *(o.domain for o in model.opset_import), *(f.name for f in model.functions), *(f.domain for f in model.functions))
    _check_opsets(model, p)
    _check_graph(model.graph, p, outer=(), where="")
    external = _check_external_data(model, p)
    try:
        onnx.checker.check_model(str(p), full_check=False)  # by path: resolves external data beside the model
    except Exception as e:  # ValidationError, and whatever else the C++ checker throws on junk
        raise ModelLoadError(f"{p} is not a valid ONNX model: {_first_line(e)}") from e
    dense = sum(_sparse_dense_bytes(s) for s in _all_sparse(model.graph))
    ext_bytes = sum(n for _, _, n in external) if load_external_data else 0
    need = size + dense + ext_bytes
    if need > limit:
        what = [f"{fmt_bytes(ext_bytes)} of external data"] if ext_bytes else []
        if dense:
            what.append(f"{fmt_bytes(dense)} of sparse initializers made dense")
        raise MemoryLimitError(f"loading {p} needs {fmt_bytes(need)} ({', '.join(what) or 'the model file'}), more than the "
                               f"memory limit of {fmt_bytes(limit)}; {limit_hint()}")
    if load_external_data and external:
        _read_external_data(model, p, external)
    _densify_sparse(model.graph)
    _unique_node_names(model.graph)
    return model


def _all_sparse(graph: onnx.GraphProto):
    """Every SparseTensorProto: sparse initializers and sparse attribute values, sub-graphs included."""
    from .subgraphs import all_graphs

    for g in all_graphs(graph):
        yield from g.sparse_initializer
        for node in g.node:
            for a in node.attribute:
                if a.HasField("sparse_tensor"):
                    yield a.sparse_tensor
                yield from a.sparse_tensors


def _all_tensors(graph: onnx.GraphProto):
    """Every TensorProto stored in a graph: initializers, attribute tensors, sparse tensors' parts, sub-graphs."""
    from .subgraphs import all_graphs

    for g in all_graphs(graph):
        yield from g.initializer
        for node in g.node:
            for a in node.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
    for sp in _all_sparse(graph):
        yield sp.values
        yield sp.indices


def _has_external(model: onnx.ModelProto) -> bool:
    import onnx

    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in _all_tensors(model.graph))


# ------------------------------------------------------------------ load-time checks


def _opset_limits() -> dict[str, int]:
    """Newest opset per domain that both the installed onnx and (when installed) onnxruntime know."""
    global _OPSET_LIMITS
    if _OPSET_LIMITS is None:
        import onnx

        limits: dict[str, int] = {"": onnx.defs.onnx_opset_version()}
        for s in onnx.defs.get_all_schemas_with_history():
            limits[s.domain] = max(limits.get(s.domain, 0), s.since_version)
        limits[""] = onnx.defs.onnx_opset_version()
        try:
            import importlib.util

            if importlib.util.find_spec("onnxruntime") is not None:
                import onnxruntime
                from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

                # the first use of onnxruntime in every flow: its C++ logger's default (what sessions without a
                # level of their own, e.g. the quantizer's, log at) to errors only
                onnxruntime.set_default_logger_severity(3)
                ort_max: dict[str, int] = {}
                for s in ort_c.get_all_operator_schema():
                    ort_max[s.domain] = max(ort_max.get(s.domain, 0), s.since_version)
                for d, v in ort_max.items():
                    limits[d] = min(limits[d], v) if d in limits else v
        except Exception:  # an onnxruntime that does not import: onnx's limits alone
            pass
        _OPSET_LIMITS = limits
    return _OPSET_LIMITS


_OPSET_LIMITS: dict[str, int] | None = None
#: The oldest ai.onnx opset onnxruntime supports (older ones lack kernels).
MIN_OPSET = 7


def _check_opsets(model: onnx.ModelProto, p: Path) -> None:
    limits = _opset_limits()
    seen: set[str] = set()
    imports = [(o.domain, o.version, "the model") for o in model.opset_import]
    imports += [(o.domain, o.version, f"function '{f.name}'") for f in model.functions for o in f.opset_import]
    for domain, version, where in imports:
        d = "" if domain == "ai.onnx" else domain
        shown = domain or "ai.onnx"
        if where == "the model":
            if d in seen:
                raise ModelLoadError(f"{p}: the model imports opset domain '{shown}' twice")
            seen.add(d)
        if d == "" and version < MIN_OPSET:
            raise ModelLoadError(f"{p}: {where} uses ai.onnx opset {version}; edgeopt supports opsets {MIN_OPSET} to "
                                 f"{limits['']} (convert it with onnx.version_converter)")
        if version < 1:
            raise ModelLoadError(f"{p}: {where} imports opset domain '{shown}' at version {version}; versions start at 1")
        top = limits.get(d)
        if top is not None and version > top:
            raise ModelLoadError(f"{p}: {where} uses opset {version} of domain '{shown}', newer than the installed "
                                 f"onnx/onnxruntime support (at most {top})")


#: Graph input/output element types edgeopt can feed to and read from onnxruntime (numpy dtypes it converts).
_IO_DTYPES = frozenset({1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13})  # float uint8 int8 uint16 int16 int32 int64 bool f16 f64 u32 u64
#: Elements per value of the typed data fields, by data type: (field, values per element); sub-byte types left out.
_TYPED_FIELDS: dict[int, tuple[str, int]] = {
    1: ("float_data", 1), 14: ("float_data", 2), 11: ("double_data", 1), 15: ("double_data", 2), 7: ("int64_data", 1),
    12: ("uint64_data", 1), 13: ("uint64_data", 1), 8: ("string_data", 1),
    **{dt: ("int32_data", 1) for dt in (2, 3, 4, 5, 6, 9, 10, 16, 17, 18, 19, 20, 24)},
}
_DATA_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


@cache
def _bits(elem_type: int) -> int | None:
    """Bits per element of a numeric data type (None: strings, unknown types)."""
    import onnx

    sub = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}
    for name, bits in (("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2), ("FLOAT6E2M3", 6), ("FLOAT6E3M2", 6)):
        if hasattr(onnx.TensorProto, name):
            sub[getattr(onnx.TensorProto, name)] = bits
    if elem_type in sub:
        return sub[elem_type]
    if elem_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(elem_type).itemsize * 8
    except (KeyError, ValueError, TypeError):
        return None


def _valid_dtype(elem_type: int) -> bool:
    import onnx

    return elem_type != onnx.TensorProto.UNDEFINED and elem_type in onnx.TensorProto.DataType.values()


def _check_tensor(t: onnx.TensorProto, p: Path, what: str) -> None:
    """Data type, dims and stored data size of one tensor agree (external data is checked by its own pass)."""
    import onnx

    where = what.replace("{name}", f" '{t.name}'" if t.name else "")
    if not _valid_dtype(t.data_type):
        raise ModelLoadError(f"{p}: {where} has data type {t.data_type}, which is not an ONNX data type")
    if any(d < 0 for d in t.dims):
        raise ModelLoadError(f"{p}: {where} has a negative dimension {list(t.dims)}")
    elems = _prod(t.dims)
    bits = _bits(t.data_type)
    if bits is not None and elems * bits > 8 << 50:
        raise ModelLoadError(f"{p}: {where} has dims {list(t.dims)}: more than a PiB")
    if t.data_location == onnx.TensorProto.EXTERNAL:
        if t.data_type == onnx.TensorProto.STRING:
            raise ModelLoadError(f"{p}: {where} is a string tensor stored as external data, which ONNX does not allow")
        return
    if t.data_location != onnx.TensorProto.DEFAULT:
        raise ModelLoadError(f"{p}: {where} has an unknown data_location {t.data_location}")
    dims = "x".join(map(str, t.dims)) or "scalar"
    dtype = _dtype_name(t.data_type)
    if t.HasField("raw_data"):
        if bits is None:
            raise ModelLoadError(f"{p}: {where} is a {dtype} tensor with raw_data, which ONNX does not allow")
        if bits % 8 and bits not in (2, 4):
            return  # 6-bit floats: packing not checked here
        want = (elems * bits + 7) // 8
        if len(t.raw_data) != want:
            raise ModelLoadError(f"{p}: {where} has {len(t.raw_data)} bytes of raw_data, but its dims {dims} of {dtype} "
                                 f"need {want}")
        return
    field = _TYPED_FIELDS.get(t.data_type)
    if field is None:
        return
    name, per = field
    have = len(getattr(t, name))
    want = elems * per
    others = [f for f in _DATA_FIELDS if f != name and len(getattr(t, f))]
    if others:
        raise ModelLoadError(f"{p}: {where} is {dtype} but stores its values in {others[0]}")
    if have != want and not (have == 0 and elems == 0):
        raise ModelLoadError(f"{p}: {where} has {have} value(s) in {name}, but its dims {dims} of {dtype} need {want}")


def _check_value_type(vi: onnx.ValueInfoProto, p: Path, what: str, io: bool) -> None:
    """A graph input/output (``io``) or value_info: a tensor of a known element type; inputs/outputs of the main graph
    must be of a type edgeopt can feed (no strings, complex numbers, bfloat16/float8/4-bit, sequences or maps)."""
    kind = vi.type.WhichOneof("value")
    if kind != "tensor_type":
        if io:
            shown = {"sequence_type": "a sequence", "map_type": "a map", "optional_type": "an optional",
                     "sparse_tensor_type": "a sparse tensor", None: "of no type"}.get(kind, str(kind))
            raise ModelLoadError(f"{p}: {what} '{vi.name}' is {shown}; edgeopt handles models whose inputs and outputs are tensors")
        return
    tt = vi.type.tensor_type
    if not _valid_dtype(tt.elem_type):
        if not tt.elem_type:
            raise ModelLoadError(f"{p}: {what} '{vi.name[:80]}' is a tensor without an element type "
                                 "(onnxruntime refuses such models)")
        raise ModelLoadError(f"{p}: {what} '{vi.name[:80]}' has element type {tt.elem_type}, which is not an ONNX data type")
    if io and tt.elem_type not in _IO_DTYPES:
        dtype = _dtype_name(tt.elem_type) if tt.elem_type else "no element type"
        raise ModelLoadError(f"{p}: {what} '{vi.name}' is {dtype}; edgeopt feeds and reads float, float16, double, "
                             "int8-64, uint8-64 and bool tensors only")


def _check_text(p: Path, where: str, *values: Any) -> None:
    """Names and other strings must be valid UTF-8 (protobuf hands out ``bytes`` for those that are not)."""
    for v in values:
        if not isinstance(v, str):
            raise ModelLoadError(f"{p}: {where} has a name or string that is not valid UTF-8 ({bytes(v)[:40]!r})")


def _check_graph(g: onnx.GraphProto, p: Path, outer: tuple[set[str], ...], where: str) -> None:
    """Names in one graph (and, recursively, its sub-graphs): unique, defined before use, outputs produced;
    every stored tensor's type and size; the types of graph inputs and outputs."""
    import onnx

    main = not where
    scope = where or "the graph"
    _check_text(p, scope, g.name)
    inits: set[str] = set()
    for t in g.initializer:
        _check_text(p, f"an initializer of {scope}", t.name)
        if not t.name:
            raise ModelLoadError(f"{p}: {scope} has an initializer without a name")
        if t.name in inits:
            raise ModelLoadError(f"{p}: initializer name '{t.name}' is used twice in {scope}")
        inits.add(t.name)
        _check_tensor(t, p, "initializer{name}" if main else f"initializer{{name}} of {scope}")
    for s in g.sparse_initializer:
        _check_text(p, f"a sparse initializer of {scope}", s.values.name, s.indices.name)
        name = s.values.name
        if not name or name in inits:
            raise ModelLoadError(f"{p}: sparse initializer '{name}' in {scope} has no name or reuses an initializer's")
        inits.add(name)
        _check_sparse(s, p, f"sparse initializer '{name}'")
    local: set[str] = set(inits)
    inputs: set[str] = set()
    for vi in [*g.input, *g.output, *g.value_info]:
        _check_text(p, f"an input, output or value_info of {scope}", vi.name)
    for vi in g.input:
        if vi.name in inputs:
            raise ModelLoadError(f"{p}: graph input name '{vi.name}' is used twice in {scope}")
        inputs.add(vi.name)
        _check_value_type(vi, p, "graph input" if main else f"input of {scope}", io=main and vi.name not in inits)
        local.add(vi.name)
    for vi in g.value_info:
        _check_value_type(vi, p, "value_info", io=False)
    produced_at: dict[str, int] = {}
    for i, n in enumerate(g.node):
        for o in n.output:
            if o and o not in produced_at:
                produced_at[o] = i
    for i, n in enumerate(g.node):
        _check_text(p, f"node #{i} of {scope}", n.name, n.op_type, n.domain, *n.input, *n.output,
                    *(a.name for a in n.attribute), *(a.ref_attr_name for a in n.attribute))
        label = f"node #{i} '{n.name[:80]}' ({n.op_type[:80]})" if n.name else f"node #{i} ({n.op_type[:80]})"
        if main is False:
            label += f" in {scope}"
        for name in n.input:
            if name and name not in local and not any(name in scope_names for scope_names in outer):
                if name in produced_at and produced_at[name] >= i:
                    raise ModelLoadError(f"{p}: {label} reads '{name}' before node #{produced_at[name]} produces it "
                                         "(nodes are not in topological order, or form a cycle)")
                raise ModelLoadError(f"{p}: {label} reads tensor '{name}', which no graph input, initializer or earlier "
                                     "node defines")
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR or a.HasField("t"):
                _check_tensor(a.t, p, f"tensor{{name}} in attribute '{a.name}' of {label}")
            for t in a.tensors:
                _check_tensor(t, p, f"tensor{{name}} in attribute '{a.name}' of {label}")
            if a.HasField("sparse_tensor"):
                _check_sparse(a.sparse_tensor, p, f"sparse attribute '{a.name}' of {label}")
            for s in a.sparse_tensors:
                _check_sparse(s, p, f"sparse attribute '{a.name}' of {label}")
            subs = ([a.g] if a.HasField("g") else []) + list(a.graphs)
            for sub in subs:
                _check_graph(sub, p, (local, *outer), f"sub-graph '{a.name}' of {label}")
        for o in n.output:
            if not o:
                continue
            if o in local:
                raise ModelLoadError(f"{p}: tensor '{o}' is produced twice ({label} and an earlier node, input or "
                                     "initializer); ONNX graphs assign each name once")
            local.add(o)
    if main and not g.output:
        raise ModelLoadError(f"{p}: the graph has no outputs")
    outs: set[str] = set()
    for vi in g.output:
        if vi.name in outs:
            raise ModelLoadError(f"{p}: graph output '{vi.name}' is listed twice in {scope}")
        outs.add(vi.name)
        if vi.name not in local and not any(vi.name in scope_names for scope_names in outer):
            raise ModelLoadError(f"{p}: graph output '{vi.name}' of {scope} is not produced by any node, input or initializer")
        _check_value_type(vi, p, "graph output" if main else f"output of {scope}", io=main)


def _check_sparse(s: onnx.SparseTensorProto, p: Path, where: str) -> None:
    import onnx

    _check_tensor(s.values, p, f"values of {where}")
    _check_tensor(s.indices, p, f"indices of {where}")
    if any(d < 0 for d in s.dims):
        raise ModelLoadError(f"{p}: {where} has a negative dimension {list(s.dims)}")
    if s.indices.data_type != onnx.TensorProto.INT64:
        raise ModelLoadError(f"{p}: {where} has {_dtype_name(s.indices.data_type)} indices; ONNX requires int64")
    nnz = s.values.dims[0] if len(s.values.dims) == 1 else -1
    idx = list(s.indices.dims)
    if nnz < 0 or not (idx == [nnz] or idx == [nnz, len(s.dims)]):
        raise ModelLoadError(f"{p}: {where} has values of shape {list(s.values.dims)} and indices of shape {idx}; "
                             f"expected values [NNZ] and indices [NNZ] or [NNZ, {len(s.dims)}]")


def _sparse_dense_bytes(s: onnx.SparseTensorProto) -> int:
    return _prod(s.dims) * max(1, (_bits(s.values.data_type) or 8) // 8)


def _sparse_to_dense(s: onnx.SparseTensorProto) -> onnx.TensorProto:
    import numpy as np
    import onnx

    values = onnx.numpy_helper.to_array(s.values).reshape(-1)
    idx = onnx.numpy_helper.to_array(s.indices).astype(np.int64)
    shape = tuple(int(d) for d in s.dims)
    dense = np.zeros(shape, dtype=values.dtype)
    if idx.ndim == 2:  # [NNZ, rank] coordinates
        idx = np.ravel_multi_index(tuple(idx.T), shape) if idx.size else idx.reshape(-1)
    dense.reshape(-1)[idx] = values
    t = onnx.numpy_helper.from_array(dense, s.values.name)
    return t


def _densify_sparse(g: onnx.GraphProto) -> None:
    """Sparse initializers -> initializers, ``Constant`` ``sparse_value`` -> ``value``, here and in sub-graphs
    (the checker has bounded the indices; the sizes were counted against the memory limit)."""
    import onnx

    for s in g.sparse_initializer:
        g.initializer.append(_sparse_to_dense(s))
    del g.sparse_initializer[:]
    for n in g.node:
        for a in n.attribute:
            if n.op_type == "Constant" and a.name == "sparse_value" and a.HasField("sparse_tensor"):
                dense = _sparse_to_dense(a.sparse_tensor)
                a.Clear()
                a.name, a.type = "value", onnx.AttributeProto.TENSOR
                a.t.CopyFrom(dense)
            if a.HasField("g"):
                _densify_sparse(a.g)
            for sub in a.graphs:
                _densify_sparse(sub)


def _unique_node_names(g: onnx.GraphProto) -> None:
    """Duplicate node names get a suffix (``conv`` -> ``conv_1``); onnxruntime refuses a model whose nodes share a
    name, and layers are named after their nodes.  Empty names stay empty."""
    names = [n.name for n in g.node]
    taken = set(names)
    seen: set[str] = set()
    for n in g.node:
        if not n.name:
            continue
        if n.name in seen:
            k = 1
            while f"{n.name}_{k}" in taken:
                k += 1
            n.name = f"{n.name}_{k}"
            taken.add(n.name)
        seen.add(n.name)


# ------------------------------------------------------------------ external data


def _parse_external(t: onnx.TensorProto, path: Path) -> tuple[str, int, int | None]:
    """(location, offset, length or None) of an external tensor, every field checked for form."""
    fields: dict[str, str] = {}
    for e in t.external_data:
        fields[e.key] = e.value
    where = f"tensor '{t.name}'"
    loc = fields.get("location", "")
    if not loc or "\x00" in loc:
        raise ModelLoadError(f"{path}: {where} is stored as external data but names no file (location)")
    nums: list[int | None] = []
    for key in ("offset", "length"):
        v = fields.get(key)
        if v is None or v == "":
            nums.append(None)
            continue
        if not v.strip().isdigit() or not v.strip().isascii():
            raise ModelLoadError(f"{path}: {where} has external data {key} {v[:40]!r}; it must be a non-negative integer")
        nums.append(int(v.strip()))
    return loc, nums[0] or 0, nums[1]


def _check_external_data(model: onnx.ModelProto, path: Path) -> list[tuple[Path, int, int]]:
    """Check every external-data reference; returns (file, offset, bytes to read) per external tensor, in
    :func:`_all_tensors` order."""
    import onnx

    base = path.parent.resolve()
    out: list[tuple[Path, int, int]] = []
    for s in _all_sparse(model.graph):
        if onnx.TensorProto.EXTERNAL in (s.values.data_location, s.indices.data_location):
            raise ModelLoadError(f"{path}: sparse tensor '{s.values.name}' keeps its values or indices in external data, "
                                 "which edgeopt does not read; store it dense or inline")
    sizes: dict[Path, int] = {}
    for t in _all_tensors(model.graph):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location, offset, length = _parse_external(t, path)
        try:
            loc = (base / location).resolve()
        except (OSError, RuntimeError, ValueError) as e:
            raise ModelLoadError(f"tensor '{t.name}' has an unusable external data location {location[:80]!r}: {e}") from e
        if base not in loc.parents and loc != base:
            raise ModelLoadError(f"tensor '{t.name}' points at external data outside the model's folder: {location}")
        try:
            if not loc.is_file():
                raise ModelLoadError(f"external data file '{location}' for tensor '{t.name}' not found next to {path.name}")
            if loc not in sizes:
                sizes[loc] = loc.stat().st_size
        except OSError as e:
            raise ModelLoadError(f"cannot read external data file '{location[:80]}' of tensor '{t.name}': "
                                 f"{e.strerror or e}") from e
        have = sizes[loc]
        bits = _bits(t.data_type)
        want = (_prod(t.dims) * bits + 7) // 8 if bits else 0
        if length is not None and length != want:
            raise ModelLoadError(f"tensor '{t.name}' has external data length {length}, but its dims "
                                 f"{list(t.dims)} of {_dtype_name(t.data_type)} need {want} bytes")
        need = offset + want
        if offset > have or need > have:
            raise ModelLoadError(f"external data file '{location}' is truncated: tensor '{t.name}' needs bytes up to {need}, "
                                 f"file has {have}")
        out.append((loc, offset, want))
    return out


def _read_external_data(model: onnx.ModelProto, path: Path, external: list[tuple[Path, int, int]]) -> None:
    """Read each external tensor's bytes (exactly as many as its dims need) into ``raw_data``; ``external`` is what
    :func:`_check_external_data` returned for this model, unchanged since."""
    import onnx

    files: dict[Path, Any] = {}
    todo = iter(external)
    try:
        for t in [t for t in _all_tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL]:
            loc, offset, n = next(todo)
            f = files.get(loc)
            if f is None:
                f = files[loc] = open(loc, "rb")  # noqa: SIM115 - closed below
            f.seek(offset)
            data = f.read(n)
            if len(data) != n:
                raise ModelLoadError(f"external data file '{loc.name}' is truncated: tensor '{t.name}' needs {n} bytes "
                                     f"from offset {offset}, got {len(data)}")
            t.raw_data = data
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]
    except OSError as e:
        raise ModelLoadError(f"cannot read external data of {path.name}: {e.strerror or e}") from e
    finally:
        for f in files.values():
            f.close()


# --------------------------------------------------------------------------- dtypes


def _itemsize(elem_type: int) -> float:
    """Bytes per element (0.5 for 4-bit types; 0 for strings and unknown types)."""
    bits = _bits(elem_type)
    return bits / 8 if bits else 0


def _dtype_name(elem_type: int) -> str:
    import onnx

    if not elem_type:
        return "unknown"
    try:
        return onnx.TensorProto.DataType.Name(elem_type).lower()
    except ValueError:
        return f"dtype {elem_type}"


def _tensor_elems(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n


def _tensor_bytes(t: onnx.TensorProto) -> int:
    return int(round(_tensor_elems(t) * _itemsize(t.data_type)))


def _constant_value(node: onnx.NodeProto) -> tuple[list[int], int]:
    """(shape, elem_type) of a Constant node's output."""
    import onnx

    for a in node.attribute:
        if a.name == "value":
            return list(a.t.dims), a.t.data_type
        if a.name == "value_float":
            return [], onnx.TensorProto.FLOAT
        if a.name == "value_floats":
            return [len(a.floats)], onnx.TensorProto.FLOAT
        if a.name == "value_int":
            return [], onnx.TensorProto.INT64
        if a.name == "value_ints":
            return [len(a.ints)], onnx.TensorProto.INT64
        if a.name == "sparse_value":
            return list(a.sparse_tensor.dims), a.sparse_tensor.values.data_type
    return [], 0


# --------------------------------------------------------------------------- shapes


def _prod(xs) -> int:
    n = 1
    for x in xs:
        n *= int(x)
    return n


def parse_input_shapes(specs: list[str] | None) -> dict[str, list[int]]:
    """``["x=1x3x224x224", "mask=1,128"]`` -> ``{"x": [1,3,224,224], "mask": [1,128]}``."""
    out: dict[str, list[int]] = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError
            shape = [int(d) for d in dims.replace(",", "x").split("x")]
            if any(d <= 0 for d in shape):
                raise ValueError
        except ValueError:
            raise InputShapeError(f"bad --input-shape '{spec}'; expected NAME=DIMxDIMx... with positive dims, e.g. x=1x3x224x224") from None
        out[name] = shape
    return out


def _shown_dims(dims) -> str:
    return "x".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param[:20] or "?") for d in dims)


def fix_input_shapes(model: onnx.ModelProto, given: Mapping[str, list[int]] | None = None) -> dict[str, list[int]]:
    """Make every graph input static, in place: given shapes win, an unknown leading (batch) dim becomes 1.

    Raises :class:`InputShapeError` naming the inputs whose other dims are unknown.
    """
    given = dict(given or {})
    inits = {i.name for i in model.graph.initializer}
    real_inputs = [i for i in model.graph.input if i.name not in inits]
    unknown_names = sorted(set(given) - {i.name for i in real_inputs})
    if unknown_names:
        raise InputShapeError(f"--input-shape names unknown input(s) {unknown_names}; model inputs: {[i.name for i in real_inputs]}")
    shapes: dict[str, list[int]] = {}
    problems: list[str] = []
    for inp in real_inputs:
        dims = inp.type.tensor_type.shape.dim
        if inp.name in given:
            shape = given[inp.name]
            if len(dims) and len(shape) != len(dims):
                raise InputShapeError(f"--input-shape {inp.name} has rank {len(shape)}, the model's input has rank {len(dims)}")
            for i, d in enumerate(dims):
                if d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != shape[i]:
                    raise InputShapeError(f"--input-shape {inp.name} dim {i} is {shape[i]}, the model fixes it to {d.dim_value}")
        elif any(d.HasField("dim_value") and d.dim_value == 0 for d in dims):
            raise InputShapeError(f"model input {inp.name} has a dimension of 0 ({_shown_dims(dims)}): an empty tensor; "
                                  "edgeopt needs inputs with data")
        elif not inp.type.tensor_type.HasField("shape"):
            problems.append(f"{inp.name}=? (rank unknown)")
            continue
        else:
            shape = []
            symbols = []
            for i, d in enumerate(dims):
                if d.HasField("dim_value") and d.dim_value > 0:
                    shape.append(d.dim_value)
                elif i == 0:
                    shape.append(1)  # batch
                else:
                    shape.append(-1)
                    if d.HasField("dim_param") and d.dim_param and d.dim_param not in symbols:
                        symbols.append(d.dim_param[:40])
            if any(s < 0 for s in shape):
                shown = "x".join("?" if s < 0 else str(s) for s in shape)
                named = f" (symbolic {', '.join(repr(x) for x in symbols)})" if symbols else ""
                problems.append(f"{inp.name}={shown}{named}")
                continue
        del inp.type.tensor_type.shape.dim[:]
        for s in shape:
            inp.type.tensor_type.shape.dim.add().dim_value = s
        shapes[inp.name] = list(shape)
    if problems:
        example = " ".join(f"--input-shape {p.split(' (')[0].replace('?', 'N')}" for p in problems)
        raise InputShapeError(f"model input(s) with dynamic dims: {', '.join(problems)}; give them, e.g. {example}")
    return shapes


# --------------------------------------------------------------------------- analysis


#: Ops that only move or relabel data: no arithmetic.
DATA_MOVEMENT = frozenset(
    "Reshape Flatten Squeeze Unsqueeze Identity Dropout Transpose Concat Split Slice Gather GatherElements "
    "GatherND Expand Tile Pad Cast CastLike DepthToSpace SpaceToDepth Shape Size ScatterND ScatterElements "
    "QuantizeLinear DequantizeLinear".split()
)

#: (Gather is not among them: the table an embedding looks up is its parameters)
_NO_PARAM_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "Reshape", "Slice", "Pad", "Expand", "Tile", "Resize"})
#: Weight data types that count as parameters: float, uint8, int8, float16, double, bfloat16, uint4, int4.
_PARAM_DTYPES = frozenset({1, 2, 3, 10, 11, 16, 21, 22})


@dataclass
class _Ctx:
    shapes: dict[str, list[int]]
    dtypes: dict[str, int]
    const: set[str]


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _macs(node: onnx.NodeProto, ctx: _Ctx) -> int:
    s = ctx.shapes
    ins = [i for i in node.input]
    outs = node.output
    op = node.op_type

    def shp(name: str) -> list[int] | None:
        return s.get(name) if name else None

    out = shp(outs[0]) if outs else None
    if out is None:
        return 0
    out_elems = _prod(out)
    if op in ("Conv", "ConvInteger", "QLinearConv", "FusedConv", "NhwcConv"):
        w = shp(ins[3] if op == "QLinearConv" else ins[1])
        return out_elems * _prod(w[1:]) if w else 0
    if op == "ConvTranspose":
        x, w = shp(ins[0]), shp(ins[1])
        return _prod(x) * _prod(w[1:]) if x and w else 0
    if op in ("Gemm", "QGemm"):
        a = shp(ins[0])
        if not a:
            return 0
        k = a[0] if _attr(node, "transA", 0) else a[-1]
        return out_elems * k
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul", "FusedMatMul", "DynamicQuantizeMatMul"):
        a = shp(ins[0])
        return out_elems * a[-1] if a else 0
    if op == "MatMulNBits":
        return (out_elems // max(1, _attr(node, "N", 1))) * _attr(node, "N", 1) * _attr(node, "K", 0)
    if op in ("LSTM", "GRU", "RNN"):
        x, w, r = shp(ins[0]), shp(ins[1]), shp(ins[2])
        if not (x and w and r):
            return 0
        seq, batch = x[0], x[1]
        if _attr(node, "layout", 0):
            batch, seq = x[0], x[1]
        # W: [dirs, gates*hidden, input], R: [dirs, gates*hidden, hidden]
        return seq * batch * (_prod(w) + _prod(r))
    if op == "Einsum":
        eq = _attr(node, "equation", b"")
        eq = eq.decode() if isinstance(eq, bytes) else eq
        lhs = eq.replace(" ", "").split("->")[0].split(",")
        sizes: dict[str, int] = {}
        for term, name in zip(lhs, ins):
            sh = shp(name)
            if sh is None or "." in term:
                return 0
            for c, d in zip(term, sh):
                sizes[c] = max(sizes.get(c, 1), d)
        return _prod(sizes.values())
    if op == "Attention":  # com.microsoft packed attention: QKV projection + scores
        x, w = shp(ins[0]), shp(ins[1])
        if not (x and w):
            return 0
        b, sq, _ = x
        return b * sq * _prod(w) + 2 * b * sq * sq * w[1] // 3
    return 0


def _flops(node: onnx.NodeProto, macs: int, in_elems: int, out_elems: int) -> int:
    op = node.op_type
    if op in DATA_MOVEMENT:
        return 0
    if op in ("MaxPool", "AveragePool", "LpPool"):
        k = _attr(node, "kernel_shape", [1])
        return out_elems * _prod(k)
    if op in ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ArgMax", "ArgMin"):
        return in_elems
    if op in ("Softmax", "LogSoftmax"):
        return 5 * in_elems
    if op in ("BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization"):
        return 5 * out_elems
    if op in ("Resize", "Upsample"):
        return 4 * out_elems
    if op in ("Erf", "Gelu", "FastGelu", "Tanh", "Sigmoid", "Exp", "Log", "Pow", "Sqrt", "HardSwish", "HardSigmoid", "Elu", "Selu", "Softplus", "Mish"):
        return 4 * out_elems
    if macs:
        return out_elems if op in ("Conv", "Gemm", "ConvTranspose") else 0  # bias add
    return out_elems


def _simple_attributes(node: onnx.NodeProto) -> dict[str, Any]:
    """Scalar, string and number-list attributes (tensors and graphs left out)."""
    import onnx

    out: dict[str, Any] = {}
    for a in node.attribute:
        if a.type in (onnx.AttributeProto.INT, onnx.AttributeProto.FLOAT, onnx.AttributeProto.INTS, onnx.AttributeProto.FLOATS):
            v = onnx.helper.get_attribute_value(a)
            out[a.name] = list(v) if isinstance(v, (list, tuple)) else v
        elif a.type == onnx.AttributeProto.STRING:
            out[a.name] = a.s.decode(errors="replace")
    return out


def fold_constants(model: onnx.ModelProto, shapes: Mapping[str, list[int]]) -> set[str]:
    """Names of tensors whose value does not depend on the graph inputs."""
    const = {i.name for i in model.graph.initializer}
    const.add("")
    for node in model.graph.node:
        if node.op_type == "Constant":
            const.update(node.output)
        elif node.op_type in ("Shape", "Size") and node.input[0] in shapes and all(d > 0 for d in shapes[node.input[0]]):
            const.update(node.output)
        elif node.input and all(i in const for i in node.input) and not node.op_type.startswith("Random") \
                and not any(a.HasField("g") or a.graphs for a in node.attribute):  # If/Loop bodies read outer values
            const.update(node.output)
    const.discard("")
    return const


def _inference_failure(e: Exception) -> str | None:
    """The first node error of a strict shape inference failure (None when it is not about the model's shapes or
    types, e.g. an op onnx has no schema for)."""
    import re

    text = str(e)
    if "[ShapeInferenceError]" not in text and "[TypeInferenceError]" not in text:
        return None
    m = re.search(r"\(op_type:([^,)]*)(?:, node name: ([^)]*))?\): (?:\[(?:Shape|Type)InferenceError\] )?([^\n]*)", text)
    if not m:
        return None
    op, name, detail = m.groups()
    detail = " ".join(detail.split())[:200]
    return f"{op} node '{name[:80]}': {detail}" if name else f"a {op} node: {detail}"


def _infer_shapes(model: onnx.ModelProto, p: Path | None = None,
                  given: Mapping[str, list[int]] | None = None) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Shapes and element types by onnx's shape inference (with data propagation).  Strict first: a model whose
    shapes or types contradict each other (an attribute of the wrong size, a weight of the wrong rank, an input
    shape a node cannot take) is refused with :class:`ModelLoadError` naming the node, as onnxruntime would refuse
    it later; failures of another kind (ops onnx has no schema for) fall back to lenient inference."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as e:
        why = _inference_failure(e) if p is not None else None
        if why:
            shapes_given = f" with --input-shape {', '.join(given)}" if given else ""
            raise ModelLoadError(f"{p}: shape inference fails{shapes_given} at {why}") from e
        try:
            inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
        except Exception:
            inferred = model
    shapes: dict[str, list[int]] = {}
    dtypes: dict[str, int] = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            continue
        if tt.elem_type:
            dtypes[vi.name] = tt.elem_type
        if tt.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tt.shape.dim]
            if all(d > 0 for d in dims) or vi.name not in shapes:
                shapes[vi.name] = dims
    for t in model.graph.initializer:
        shapes[t.name] = list(t.dims)
        dtypes[t.name] = t.data_type
    for node in model.graph.node:
        if node.op_type == "Constant":
            shp, dt = _constant_value(node)
            shapes[node.output[0]] = shp
            dtypes[node.output[0]] = dt
    return shapes, dtypes


def expose_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs the intermediate tensors ``names``."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.add().name = n
    return m


#: Tensors with more elements than this lose their data in the copy :func:`analyze` works on (no shape tensor is
#: that long; shape inference treats them like external data).
_SKELETON_ELEMS = 4096
_ELIDED = "__edgeopt_elided__"


def _light_tensor(t: onnx.TensorProto) -> onnx.TensorProto:
    import onnx

    if _prod(t.dims) <= _SKELETON_ELEMS or t.data_location == onnx.TensorProto.EXTERNAL:
        return t
    light = onnx.TensorProto(name=t.name, dims=t.dims, data_type=t.data_type, data_location=onnx.TensorProto.EXTERNAL)
    e = light.external_data.add()
    e.key, e.value = "location", _ELIDED
    return light


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` for analysis, without the data of big initializers and ``Constant`` values: dims, types
    and small (shape) tensors are all analysis reads, and a copy of the weights would double the memory it needs."""
    import onnx

    m = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name == "graph":
            continue
        target = getattr(m, field.name)
        if hasattr(target, "extend"):  # repeated
            target.extend(value)
        elif hasattr(target, "CopyFrom"):  # a message
            target.CopyFrom(value)
        else:
            setattr(m, field.name, value)
    src, g = model.graph, m.graph
    g.name, g.doc_string = src.name, src.doc_string
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    g.initializer.extend(_light_tensor(t) for t in src.initializer)
    for node in src.node:
        if node.op_type == "Constant" and any(a.HasField("t") and _prod(a.t.dims) > _SKELETON_ELEMS for a in node.attribute):
            light = g.node.add()
            light.CopyFrom(onnx.NodeProto(input=node.input, output=node.output, name=node.name, op_type=node.op_type,
                                          domain=node.domain))
            for a in node.attribute:
                na = light.attribute.add()
                if a.HasField("t"):
                    na.name, na.type = a.name, a.type
                    na.t.CopyFrom(_light_tensor(a.t))
                else:
                    na.CopyFrom(a)
        else:
            g.node.append(node)
    return m


#: Seconds the one run of a model that finds the shapes shape inference cannot derive may take.
RUN_TIMEOUT_S = 300.0

_RUN_CHILD = r"""
import json, os, sys
spec = json.loads(sys.stdin.read())
sys.path[:0] = spec["sys_path"]

def done(**kw):
    sys.stdout.write("\n" + json.dumps(kw) + "\n")
    sys.stdout.flush()
    os._exit(0)

def status(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None

try:
    import numpy as np
    import onnx
    import onnxruntime as ort
    from edgeopt.graph import load_model
    from edgeopt.memory import set_max_memory

    set_max_memory(spec["limit"])
    m = load_model(spec["path"], load_external_data=True)
    have = {o.name for o in m.graph.output}
    for n in spec["names"]:
        if n not in have:
            m.graph.output.add().name = n
    data = m.SerializeToString()
    del m
    ort.set_default_logger_severity(3)
    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.enable_cpu_mem_arena = False
    so.enable_mem_pattern = False
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    vm, rss = status("VmSize"), status("VmRSS")
    if spec["cap"] and vm and rss:
        import resource

        cap = vm + max(spec["limit"] - rss, 32 << 20)
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            cap = min(cap, hard)
        if soft == resource.RLIM_INFINITY or cap < soft:
            resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    del data
    rng = np.random.default_rng(0)
    feeds = {}
    for i in sess.get_inputs():
        if i.name not in spec["inputs"]:
            continue
        shape, elem = spec["inputs"][i.name]
        dt = onnx.helper.tensor_dtype_to_np_dtype(elem)
        feeds[i.name] = rng.random(shape, dtype=np.float32).astype(dt) if dt.kind == "f" else np.zeros(shape, dt)
    res = sess.run(spec["names"], feeds)
    done(shapes={n: [int(d) for d in getattr(r, "shape", ())] for n, r in zip(spec["names"], res)})
except MemoryError:
    done(error="MemoryError", memory=True)
except BaseException as e:
    text = " ".join(str(e).split())[:300]
    low = text.lower()
    done(error=f"{type(e).__name__}: {text}",
         memory=any(k in low for k in ("alloc", "memory", "bad_alloc")) or type(e).__name__ == "MemoryLimitError")
"""


def _shapes_by_running(path: Path, names: list[str], inputs: Mapping[str, tuple[list[int], int]], *,
                       limit: int) -> tuple[dict[str, list[int]], str | None]:
    """Last resort for shapes that inference cannot derive: run the model once in onnxruntime, in a child process
    whose address space is capped at the memory limit (``RLIMIT_AS``), with onnxruntime's memory arena off, so a
    model whose shapes lie (a ``ConstantOfShape``/``Expand``/``Tile`` driven by a computed shape) cannot take more.

    Returns the shapes found and, if the model could not be run, why (for a note).  Raises
    :class:`MemoryLimitError` when the run ran out of memory under the cap.
    """
    import importlib.util
    import json
    import signal
    import subprocess
    import sys

    if importlib.util.find_spec("onnxruntime") is None:
        return {}, "onnxruntime is not installed"
    spec = {"path": str(path.resolve()), "names": list(names), "inputs": {k: [list(s), dt] for k, (s, dt) in inputs.items()},
            "limit": int(limit), "cap": sys.platform.startswith("linux"),
            "sys_path": [str(Path(__file__).resolve().parents[1])]}
    try:
        proc = subprocess.run([sys.executable, "-c", _RUN_CHILD], input=json.dumps(spec), capture_output=True,
                              text=True, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {}, f"running it in onnxruntime took over {RUN_TIMEOUT_S:.0f} s"
    except OSError as e:
        return {}, f"could not start a process to run it: {e.strerror or e}"
    result = None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            try:
                result = json.loads(line)
            except ValueError:
                result = None
            break
    what = (f"running {path.name} once in onnxruntime to find {len(names)} tensor shape(s) that shape inference cannot "
            f"derive (e.g. '{names[0][:80]}')")
    if result is None:
        how = f"exit status {proc.returncode}"
        if proc.returncode < 0:
            try:
                how = signal.Signals(-proc.returncode).name
            except ValueError:
                how = f"signal {-proc.returncode}"
        raise MemoryLimitError(f"{what} crashed ({how}) within the memory limit of {fmt_bytes(limit)}: the model needs "
                               f"more memory than that, or onnxruntime cannot run it; {limit_hint()}")
    if "shapes" in result:
        return {k: v for k, v in result["shapes"].items() if isinstance(v, list)}, None
    if result.get("memory"):
        import re

        err = str(result.get("error", ""))
        node = re.search(r"running (\w+) node", err)
        at = f" (onnxruntime failed to allocate at a {node.group(1)} node)" if node else f" ({err[:120]})"
        raise MemoryLimitError(f"{what} needs more than the memory limit of {fmt_bytes(limit)}{at}; {limit_hint()}")
    return {}, f"onnxruntime could not run it ({result.get('error', 'unknown error')[:160]})"


def _check_conv_channels(node: onnx.NodeProto, shapes: Mapping[str, list[int]], p: Path) -> None:
    """Input channels against the weight and ``group`` (onnx's shape inference does not check them; onnxruntime
    fails at the first run)."""
    if len(node.input) < 2:
        return
    x, w = shapes.get(node.input[0]), shapes.get(node.input[1])
    if not x or not w or len(x) < 3 or len(w) != len(x) or x[1] <= 0 or any(d <= 0 for d in w[:2]):
        return
    group = _attr(node, "group", 1) or 1
    want = w[1] * group if node.op_type == "Conv" else w[0]
    if x[1] != want or (node.op_type == "Conv" and w[0] % group):
        raise ModelLoadError(f"{p}: {node.op_type} node '{node.name[:80]}' gets {x[1]} input channels, but its weight "
                             f"'{node.input[1][:80]}' {w} with group {group} takes {want}")


def _peak_live_bytes(intervals: list[tuple[int, int, int]], steps: int) -> int:
    """The most bytes alive at one step, from ``(first, last, bytes)`` lifetimes (a difference array: linear)."""
    delta = [0] * (steps + 2)
    for a, b, n in intervals:
        delta[max(a, 0)] += n
        delta[b + 1] -= n
    peak = live = 0
    for d in delta:
        live += d
        peak = max(peak, live)
    return peak


def analyze(path: str | Path, input_shapes: Mapping[str, list[int]] | None = None,
            model: onnx.ModelProto | None = None) -> ModelAnalysis:
    """Analyse an ONNX model file (``model`` may pass the already-loaded proto of ``path``).

    ``If``/``Loop`` nodes static at these input shapes are folded first, in ``model`` itself (the input dims a folded
    condition read are pinned in it): what is built from ``model`` afterwards is what was analysed.  Control flow on
    input values stays, one layer each.

    Linear in the graph's size.  Shapes come from onnx's shape inference; only where it cannot derive some is the
    model run once (see :func:`_shapes_by_running`), and only if inputs, weights and the activations whose shapes are
    known fit :func:`max_memory` (:class:`MemoryLimitError` otherwise).
    """
    import onnx

    p = Path(path)
    model = load_model(p) if model is None else model
    work = _skeleton(model)
    fixed = fix_input_shapes(work, input_shapes)
    from .passes.fold_control import fold_control_flow, has_control_flow

    control_folded = fold_control_flow(model, fixed) if has_control_flow(model) else []
    if control_folded:  # static If/Loop inlined in ``model`` itself: what is built is what is analysed
        work = _skeleton(model)
        fixed = fix_input_shapes(work, input_shapes)
    shapes, dtypes = _infer_shapes(work, p, input_shapes)
    shapes.update(fixed)
    const = fold_constants(work, shapes)
    ctx = _Ctx(shapes, dtypes, const)
    notes: list[str] = []
    if control_folded:
        notes.append(f"{len(control_folded)} If/Loop node(s) with a condition or trip count static at these input shapes "
                     f"folded into the graph (e.g. {control_folded[0]})")

    # roots: the stored tensors each constant depends on
    init_bytes = {t.name: _tensor_bytes(t) for t in work.graph.initializer}
    roots: dict[str, frozenset[str]] = {n: frozenset([n]) for n in init_bytes}
    for node in work.graph.node:
        if node.op_type == "Constant":
            shp, dt = _constant_value(node)
            init_bytes[node.output[0]] = int(round(_prod(shp) * _itemsize(dt)))
            roots[node.output[0]] = frozenset([node.output[0]])
        elif node.output and node.output[0] in const:
            r = frozenset().union(*(roots.get(i, frozenset()) for i in node.input if i))
            for o in node.output:
                roots[o] = r

    layer_nodes = [n for n in work.graph.node if not (n.output and all(o in const for o in n.output if o))]
    outputs = [o.name for o in work.graph.output]
    output_set = set(outputs)
    graph_inputs = [i.name for i in work.graph.input if i.name not in const]
    # tensor lifetimes: first = the step that creates it (-1: graph input), last = the last step reading it
    first_use: dict[str, int] = dict.fromkeys(graph_inputs, -1)
    last_use: dict[str, int] = {}
    for step, node in enumerate(layer_nodes):
        for i in node.input:
            if i and i not in const:
                last_use[i] = step
        for o in node.output:
            if o:
                first_use[o] = step

    def known(name: str) -> bool:
        s = shapes.get(name)
        return s is not None and all(d > 0 for d in s)

    missing = sorted({o for n in layer_nodes for o in n.output if o and not known(o)})
    if missing:
        limit = max_memory()
        run_inputs = {n: (fixed[n], dtypes.get(n, onnx.TensorProto.FLOAT)) for n in graph_inputs if n in fixed}
        in_bytes = sum(int(_prod(s) * _itemsize(dt)) for s, dt in run_inputs.values())
        w_bytes = sum(init_bytes.values())
        act = _peak_live_bytes([(f, max(f, len(layer_nodes) if n in output_set else last_use.get(n, f)),
                                 int(_prod(shapes[n]) * (_itemsize(dtypes.get(n, 1)) or 4)))
                                for n, f in first_use.items() if f >= 0 and known(n)], len(layer_nodes))
        need = in_bytes + w_bytes + act
        if need > limit:
            raise MemoryLimitError(
                f"{p.name}: shape inference cannot derive {len(missing)} tensor shape(s) (e.g. '{missing[0][:80]}'), and "
                f"running the model once to find them needs at least {fmt_bytes(need)} (inputs {fmt_bytes(in_bytes)}, "
                f"weights {fmt_bytes(w_bytes)}, activations {fmt_bytes(act)}), more than the memory limit of "
                f"{fmt_bytes(limit)}; give smaller --input-shape values, or {limit_hint()}")
        if control_folded and not _has_external(model):  # run what is analysed: the file still has the If/Loop
            import tempfile

            with tempfile.TemporaryDirectory() as d:
                onnx.save(model, os.path.join(d, p.name))
                found, why = _shapes_by_running(Path(d) / p.name, missing, run_inputs, limit=limit)
        else:
            found, why = _shapes_by_running(p, missing, run_inputs, limit=limit)
        shapes.update(found)
        still = [o for o in missing if not known(o)]
        if still:
            reason = f" ({why})" if why else ""
            notes.append(f"{len(still)} tensor(s) have no static shape (e.g. {still[0]}){reason}; their sizes count as 0")

    seen_roots: set[str] = set()
    layers: list[LayerInfo] = []
    for step, node in enumerate(layer_nodes):
        w_inputs = [i for i in node.input if i and i in const]
        act_inputs = [i for i in node.input if i and i not in const]
        params = 0
        if node.op_type not in _NO_PARAM_OPS:
            for i in w_inputs:
                dt = dtypes.get(i, 0)
                if dt in _PARAM_DTYPES:
                    shp = shapes.get(i, [])
                    if shp and _prod(shp) > 1:  # scalars (hard-swish's 3 and 6, eps) are not parameters
                        params += _prod(shp)
        wb = 0
        for i in w_inputs:
            for r in roots.get(i, ()):
                if r not in seen_roots:
                    seen_roots.add(r)
                    wb += init_bytes.get(r, 0)
        for sub in (a for a in node.attribute if a.HasField("g") or a.graphs):
            for g in ([sub.g] if sub.HasField("g") else list(sub.graphs)):
                wb += sum(_tensor_bytes(t) for t in _all_tensors(g))
                notes.append(f"{node.op_type} '{node.name}' has a sub-graph; it is analysed as one layer")
        in_elems = sum(_prod(shapes.get(i, [0])) for i in act_inputs)
        outs = [o for o in node.output if o]
        out_shapes = [shapes.get(o, []) for o in outs]
        out_elems = sum(_prod(s) if s and all(d > 0 for d in s) else 0 for s in out_shapes)
        if node.op_type in ("Conv", "ConvTranspose") and not node.domain:
            _check_conv_channels(node, shapes, p)
        macs = _macs(node, ctx)
        is_weighted = params > 0 and node.op_type in QUANTIZABLE_OPS
        layers.append(LayerInfo(
            name=node.name or f"{node.op_type}_{step}", op_type=node.op_type, domain=node.domain,
            inputs=list(node.input), outputs=outs, weights=w_inputs, weight_shapes=[shapes.get(i, []) for i in w_inputs],
            attributes=_simple_attributes(node), params=params, weight_bytes=wb,
            macs=macs, flops=_flops(node, macs, in_elems, out_elems), input_elems=in_elems, output_elems=out_elems,
            output_shapes=out_shapes, quantizable=is_weighted,
        ))
    names = [ly.name for ly in layers]
    if len(set(names)) != len(names):
        notes.append("some nodes share a name; layers are listed under their first name")

    tensors: list[TensorInfo] = []
    for name, first in sorted(first_use.items(), key=lambda kv: kv[1]):
        shp = shapes.get(name, [])
        elems = _prod(shp) if shp and all(d > 0 for d in shp) else 0
        last = len(layers) if name in output_set else last_use.get(name, first)
        tensors.append(TensorInfo(name=name, shape=shp, dtype=_dtype_name(dtypes.get(name, 0)), elems=elems,
                                  first=first, last=max(last, first)))

    unused = set(init_bytes) - {r for ly in layers for i in ly.weights for r in roots.get(i, ())}
    unused_bytes = sum(init_bytes[u] for u in unused)
    if unused_bytes:
        notes.append(f"{len(unused)} constant(s) ({unused_bytes} bytes) are not used by any layer (shape computations or dead weights)")
    n_constant_nodes = sum(1 for n in work.graph.node if n.op_type == "Constant")
    if n_constant_nodes:
        notes.append(f"{n_constant_nodes} weights/constants are Constant nodes, not initializers")
    if _has_external(model):
        notes.append("weights are stored as external data")
    opset = next((o.version for o in work.opset_import if o.domain in ("", "ai.onnx")), 0)
    return ModelAnalysis(
        path=str(p), sha256=sha256_file(p), opset=opset,
        producer=f"{work.producer_name} {work.producer_version}".strip(),
        inputs={n: shapes.get(n, []) for n in graph_inputs},
        outputs={n: shapes.get(n, []) for n in outputs},
        layers=layers, tensors=tensors,
        total_params=sum(ly.params for ly in layers),
        total_weight_bytes=sum(ly.weight_bytes for ly in layers),
        total_macs=sum(ly.macs for ly in layers), total_flops=sum(ly.flops for ly in layers),
        file_bytes=p.stat().st_size + _external_bytes(model, p), notes=notes,
    )


def _external_bytes(model: onnx.ModelProto, path: Path) -> int:
    import onnx
    from onnx.external_data_helper import ExternalDataInfo

    files = {ExternalDataInfo(t).location for t in _all_tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL}
    return sum((path.parent / f).stat().st_size for f in files)


#: Ops whose constant inputs are weights a quantizer or pruner changes.
QUANTIZABLE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN", "Einsum", "Attention"})


# --------------------------------------------------------------------------- memory planning


@dataclass(frozen=True)
class ArenaPlan:
    """Where each activation tensor lives in one arena."""

    peak_live_bytes: int  # lower bound: the most bytes alive at one step
    arena_bytes: int  # what the greedy planner needs (>= peak_live_bytes)
    offsets: dict[str, int]
    sizes: dict[str, int]
    peak_step: int


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def plan_arena(tensors: list[TensorInfo], nbytes: Callable[[TensorInfo], int], *, alignment: int = 16) -> ArenaPlan:
    """Greedy-by-size arena planning, as TFLite Micro's GreedyMemoryPlanner does.

    Buffers are placed largest first, each at the lowest aligned offset where it
    overlaps no placed buffer whose lifetime [first, last] intersects its own.

    O(n log n + clashes log n): the live bytes per step come from a difference array, and the placed buffers whose
    lifetimes intersect a new one from a segment tree over buffers sorted by first step that keeps, per node, the
    latest last step among placed buffers (a 50k-layer chain plans in a second; the scan of every placed buffer
    for each new one it replaces was quadratic).
    """
    from bisect import bisect_right

    bufs = [t for t in tensors if t.elems > 0]
    sizes = {t.name: _align(max(0, int(nbytes(t))), alignment) for t in bufs}
    life = {t.name: (max(t.first, 0), t.last) for t in bufs}
    steps = max((b for _, b in life.values()), default=0) + 1
    delta = [0] * (steps + 1)
    for name, (a, b) in life.items():
        if a <= b:
            delta[a] += sizes[name]
            delta[b + 1] -= sizes[name]
    live, acc = [0] * max(steps, 0), 0
    for s in range(steps):
        acc += delta[s]
        live[s] = acc
    peak_step = max(range(steps), key=live.__getitem__) if steps > 0 else 0

    n = len(bufs)
    by_start = sorted(range(n), key=lambda i: life[bufs[i].name][0])
    starts = [life[bufs[i].name][0] for i in by_start]
    pos = [0] * n
    for k, i in enumerate(by_start):
        pos[i] = k
    width = 1
    while width < n:
        width *= 2
    tree = [-2] * (2 * width)  # per node: the latest last step of the placed buffers below it (-2: none)
    placed_at: list[tuple[int, int]] = [(0, 0)] * n  # by start position: (offset, end) once placed
    order = sorted(range(n), key=lambda i: (-sizes[bufs[i].name], life[bufs[i].name][0], bufs[i].name))
    offsets: dict[str, int] = {}
    arena = 0
    for i in order:
        t = bufs[i]
        size = sizes[t.name]
        a, b = life[t.name]
        hi = bisect_right(starts, b)  # buffers that start no later than this one ends
        clashes: list[tuple[int, int]] = []
        stack = [(1, 0, width)] if hi else []
        while stack:
            node, lo, up = stack.pop()
            if lo >= hi or tree[node] < a:
                continue
            if up - lo == 1:
                clashes.append(placed_at[lo])
                continue
            mid = (lo + up) // 2
            stack.append((2 * node, lo, mid))
            stack.append((2 * node + 1, mid, up))
        clashes.sort()
        offset = 0
        for o, e in clashes:
            if offset + size <= o:
                break
            offset = max(offset, _align(e, alignment))
        offsets[t.name] = offset
        arena = max(arena, offset + size)
        k = pos[i]
        placed_at[k] = (offset, offset + size)
        node = k + width
        tree[node] = b
        node //= 2
        while node and tree[node] < b:
            tree[node] = b
            node //= 2
    return ArenaPlan(peak_live_bytes=max(live, default=0), arena_bytes=arena, offsets=offsets, sizes=sizes, peak_step=peak_step)


def model_size_on_disk(path: str | Path) -> int:
    return os.path.getsize(path)
