"""Recovery by distillation: fine-tune a compressed model (the *student*) against its original (the *teacher*) on
unlabeled calibration data, so that aggressive compression (2:4 or 50% unstructured pruning, channel pruning, 4-bit
weights) keeps the original's predictions.

Route: both ONNX graphs are run in PyTorch by :class:`TorchGraph`, a small interpreter of the ONNX ops edgeopt's
models and passes produce (Conv, Gemm, MatMul, activations, pooling, element-wise arithmetic, shape plumbing; see
:data:`OPS`).  onnx2torch is not used: it imports torchvision, which does not install beside the pinned CPU torch,
and an interpreter keeps every tensor name, so that intermediate features can be matched by name and the trained
student goes back to ONNX by writing its weights into the student's own graph (same nodes, names, shapes and
opset: nothing for an exporter to change).  An op outside :data:`OPS` is one :class:`RecoveryError` naming it.

Training (``steps`` Adam steps with cosine decay, bounded by ``time_budget_s``):

* loss = ``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` on classifier logits (``[N, classes]`` outputs; MSE
  normalised by the teacher's power for any other output) + ``feature_weight`` * normalised MSE at up to
  ``features`` intermediate tensors with the same name and shape in both graphs (block outputs; spread over the
  depth) + cross-entropy with the labels when they are given;
* augmentation of image inputs (4-D float NCHW), identical for teacher and student: a random resized crop/shift
  (scale 0.7-1, one affine resample per batch), horizontal flips (images of 32 pixels or more), and brightness/
  contrast jitter;
* sparsity masks: every weight of a Conv/Gemm/MatMul with zeros (2:4, unstructured) keeps exactly those zeros
  (gradients masked, weights re-masked after each step), so 2:4 stays 2:4;
* ``quantize={weight: bits}`` (or ``{"*": bits}``): LSQ fake-quant of those weights, symmetric per output channel,
  codes in ``[-(2^(b-1)-1), 2^(b-1)-1]``, a learned scale per channel (initialised at ``max|w| / qmax``, gradient
  scaled by ``1/sqrt(numel * qmax)``), straight-through rounding.

Hand-over of the learned scales: the exported weights *are* the fake-quant values ``s_c * q`` (float32, on the
learned grid), and :attr:`RecoveryResult.scales` holds ``s_c`` per weight.  A later quantization pass therefore sees
weights that already lie on a grid: 4-bit per-channel palettization (``palettize`` with ``bits=4,
granularity=per_channel``) reproduces them exactly (at most 15 distinct values per channel), and a per-channel
absmax quantizer (``int8``'s weights with ``bits=8``) reproduces them exactly for every channel whose largest code is
``qmax`` (LSQ's scales clip, so that is the usual case); :func:`grid_report` measures both.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import EdgeoptError
from .types import RecoveryRecord

if TYPE_CHECKING:  # pragma: no cover
    import onnx
    import torch

    from .calibration import CalibrationData


class RecoveryError(EdgeoptError):
    """A recovery that cannot run (an op the interpreter lacks, data that does not fit)."""


#: ops whose input 1 (weight) and input 2 (bias) are trained
WEIGHTED = ("Conv", "Gemm", "MatMul", "ConvTranspose")


@dataclass
class RecoveryResult:
    model: onnx.ModelProto
    record: RecoveryRecord
    #: weight -> its learned per-channel LSQ step, shaped to broadcast against the weight ([O, 1, 1, 1] for a Conv)
    scales: dict[str, np.ndarray] = field(default_factory=dict)


# --------------------------------------------------------------------------- ONNX -> torch


def _attrs(node) -> dict[str, Any]:
    import onnx

    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def _pads_2d(pads: list[int], nd: int) -> list[int]:
    """ONNX pads [b1, b2, ..., e1, e2, ...] -> F.pad order (last dim first)."""
    out = []
    for i in reversed(range(nd)):
        out += [pads[i], pads[i + nd]]
    return out


def _same_pads(size: list[int], k: list[int], s: list[int], d: list[int], upper: bool) -> list[int]:
    begin, end = [], []
    for n, kk, ss, dd in zip(size, k, s, d):
        total = max((math.ceil(n / ss) - 1) * ss + (kk - 1) * dd + 1 - n, 0)
        small = total // 2
        begin.append(small if upper else total - small)
        end.append(total - small if upper else small)
    return begin + end


def _conv(x, w, b, a):
    import torch.nn.functional as F

    nd = w.dim() - 2
    s = list(a.get("strides", [1] * nd))
    d = list(a.get("dilations", [1] * nd))
    k = list(w.shape[2:])
    auto = a.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = _same_pads(list(x.shape[2:]), k, s, d, auto == "SAME_UPPER")
    elif auto == "VALID":
        pads = [0] * (2 * nd)
    else:
        pads = list(a.get("pads", [0] * (2 * nd)))
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    if pads[:nd] == pads[nd:]:
        return fn(x, w, b, s, pads[:nd], d, a.get("group", 1))
    return fn(F.pad(x, _pads_2d(pads, nd)), w, b, s, 0, d, a.get("group", 1))


def _pool(x, a, kind: str):
    import torch.nn.functional as F

    k = list(a["kernel_shape"])
    nd = len(k)
    s = list(a.get("strides", [1] * nd))
    pads = list(a.get("pads", [0] * (2 * nd)))
    auto = a.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = _same_pads(list(x.shape[2:]), k, s, [1] * nd, auto == "SAME_UPPER")
    ceil = bool(a.get("ceil_mode", 0))
    if kind == "max":
        fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
        if pads[:nd] != pads[nd:] or any(p > kk // 2 for p, kk in zip(pads, k)):
            x = F.pad(x, _pads_2d(pads, nd), value=float("-inf"))
            pads = [0] * (2 * nd)
        return fn(x, k, s, pads[:nd], list(a.get("dilations", [1] * nd)), ceil_mode=ceil)
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
    include = bool(a.get("count_include_pad", 0))
    if pads[:nd] != pads[nd:] or any(p > kk // 2 for p, kk in zip(pads, k)):
        if not include and any(pads):
            raise RecoveryError("AveragePool with asymmetric pads and count_include_pad=0 is not supported")
        x = F.pad(x, _pads_2d(pads, nd))
        pads = [0] * (2 * nd)
    return fn(x, k, s, pads[:nd], ceil_mode=ceil, count_include_pad=include)


def _gemm(x, w, b, a):
    import torch

    if a.get("transA", 0):
        x = x.transpose(0, 1)
    y = torch.matmul(x, w.transpose(0, 1) if a.get("transB", 0) else w)
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    if alpha != 1.0:
        y = y * alpha
    if b is not None and beta != 0.0:
        y = y + (b * beta if beta != 1.0 else b)
    return y


def _axes(node_inputs: list, a: dict, index: int = 1) -> list[int] | None:
    if "axes" in a:
        return list(a["axes"])
    if len(node_inputs) > index and node_inputs[index] is not None:
        return [int(v) for v in node_inputs[index].reshape(-1).tolist()]
    return None


def _reshape(x, shape, a):
    shape = [int(v) for v in shape.reshape(-1).tolist()]
    if not a.get("allowzero", 0):
        shape = [x.shape[i] if v == 0 else v for i, v in enumerate(shape)]
    return x.reshape(shape)


def _clip(x, lo, hi, a):
    import torch

    lo = a.get("min", lo.item() if isinstance(lo, torch.Tensor) else lo)
    hi = a.get("max", hi.item() if isinstance(hi, torch.Tensor) else hi)
    return torch.clamp(x, lo, hi)


def _slice(x, starts, ends, axes=None, steps=None):
    starts = starts.reshape(-1).tolist()
    ends = ends.reshape(-1).tolist()
    axes = list(range(len(starts))) if axes is None else axes.reshape(-1).tolist()
    steps = [1] * len(starts) if steps is None else steps.reshape(-1).tolist()
    idx = [slice(None)] * x.dim()
    for s, e, ax, st in zip(starts, ends, axes, steps):
        if st != 1:
            raise RecoveryError("Slice with a step other than 1 is not supported")
        n = x.shape[ax]
        s = max(0, min(n, s + n if s < 0 else s))
        e = max(0, min(n, e + n if e < 0 else e))
        idx[ax] = slice(s, e)
    return x[tuple(idx)]


def _ops() -> dict[str, Callable]:
    import torch
    import torch.nn.functional as F

    def opt(ins, i):
        return ins[i] if len(ins) > i else None

    def reduce_mean(ins, a):
        axes = _axes(ins, a)
        keep = bool(a.get("keepdims", 1))
        return ins[0].mean(dim=axes, keepdim=keep) if axes else ins[0].mean().reshape([1] * ins[0].dim() if keep else [])

    def bn(ins, a):
        x, scale, bias, mean, var = ins[:5]
        shape = [1, -1] + [1] * (x.dim() - 2)
        inv = scale / torch.sqrt(var + a.get("epsilon", 1e-5))
        return (x - mean.reshape(shape)) * inv.reshape(shape) + bias.reshape(shape)

    def cast(ins, a):
        to = a["to"]
        dtype = {1: torch.float32, 6: torch.int32, 7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64}.get(to)
        if dtype is None:
            raise RecoveryError(f"Cast to ONNX type {to} is not supported")
        return ins[0].to(dtype)

    def softmax(ins, a):
        return torch.softmax(ins[0], dim=a.get("axis", -1))

    return {
        "Conv": lambda ins, a: _conv(ins[0], ins[1], opt(ins, 2), a),
        "Gemm": lambda ins, a: _gemm(ins[0], ins[1], opt(ins, 2), a),
        "MatMul": lambda ins, a: torch.matmul(ins[0], ins[1]),
        "Relu": lambda ins, a: torch.relu(ins[0]),
        "LeakyRelu": lambda ins, a: F.leaky_relu(ins[0], a.get("alpha", 0.01)),
        "Clip": lambda ins, a: _clip(ins[0], opt(ins, 1), opt(ins, 2), a),
        "Sigmoid": lambda ins, a: torch.sigmoid(ins[0]),
        "HardSigmoid": lambda ins, a: torch.clamp(ins[0] * a.get("alpha", 0.2) + a.get("beta", 0.5), 0, 1),
        "HardSwish": lambda ins, a: F.hardswish(ins[0]),
        "Tanh": lambda ins, a: torch.tanh(ins[0]),
        "Erf": lambda ins, a: torch.erf(ins[0]),
        "Gelu": lambda ins, a: F.gelu(ins[0], approximate=a.get("approximate", "none")),
        "Exp": lambda ins, a: torch.exp(ins[0]),
        "Sqrt": lambda ins, a: torch.sqrt(ins[0]),
        "Neg": lambda ins, a: -ins[0],
        "Abs": lambda ins, a: torch.abs(ins[0]),
        "Softmax": lambda ins, a: softmax(ins, a),
        "Add": lambda ins, a: ins[0] + ins[1],
        "Sub": lambda ins, a: ins[0] - ins[1],
        "Mul": lambda ins, a: ins[0] * ins[1],
        "Div": lambda ins, a: ins[0] / ins[1] if ins[0].is_floating_point() else torch.div(ins[0], ins[1], rounding_mode="trunc"),
        "Pow": lambda ins, a: torch.pow(ins[0], ins[1]),
        "Max": lambda ins, a: torch.stack(torch.broadcast_tensors(*ins)).amax(0),
        "Min": lambda ins, a: torch.stack(torch.broadcast_tensors(*ins)).amin(0),
        "MaxPool": lambda ins, a: _pool(ins[0], a, "max"),
        "AveragePool": lambda ins, a: _pool(ins[0], a, "avg"),
        "GlobalAveragePool": lambda ins, a: ins[0].mean(dim=tuple(range(2, ins[0].dim())), keepdim=True),
        "GlobalMaxPool": lambda ins, a: ins[0].amax(dim=tuple(range(2, ins[0].dim())), keepdim=True),
        "Flatten": lambda ins, a: ins[0].reshape(int(np.prod(ins[0].shape[: a.get("axis", 1)])), -1),
        "Reshape": lambda ins, a: _reshape(ins[0], ins[1], a),
        "Transpose": lambda ins, a: ins[0].permute(*a["perm"]) if "perm" in a else ins[0].permute(*reversed(range(ins[0].dim()))),
        "Concat": lambda ins, a: torch.cat(ins, dim=a["axis"]),
        "Identity": lambda ins, a: ins[0],
        "Dropout": lambda ins, a: ins[0],
        "BatchNormalization": bn,
        "ReduceMean": reduce_mean,
        "Squeeze": lambda ins, a: ins[0].squeeze(tuple(_axes(ins, a))) if _axes(ins, a) else ins[0].squeeze(),
        "Unsqueeze": lambda ins, a: _unsqueeze(ins[0], _axes(ins, a)),
        "Shape": lambda ins, a: torch.tensor(list(ins[0].shape)[a.get("start", 0): a.get("end")], dtype=torch.int64),
        "Gather": lambda ins, a: torch.index_select(ins[0], a.get("axis", 0), ins[1].reshape(-1)).reshape(
            *ins[0].shape[: a.get("axis", 0) % ins[0].dim()], *ins[1].shape, *ins[0].shape[a.get("axis", 0) % ins[0].dim() + 1:]),
        "Cast": cast,
        "Slice": lambda ins, a: _slice(ins[0], *ins[1:]),
    }


def _unsqueeze(x, axes):
    for ax in sorted(ax % (x.dim() + len(axes)) for ax in axes):
        x = x.unsqueeze(ax)
    return x


#: the ONNX ops :class:`TorchGraph` runs
OPS = ("Conv", "Gemm", "MatMul", "Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Gelu",
       "Exp", "Sqrt", "Neg", "Abs", "Softmax", "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "MaxPool", "AveragePool",
       "GlobalAveragePool", "GlobalMaxPool", "Flatten", "Reshape", "Transpose", "Concat", "Identity", "Dropout",
       "BatchNormalization", "ReduceMean", "Squeeze", "Unsqueeze", "Shape", "Gather", "Cast", "Slice", "Constant")


def _safe(name: str) -> str:
    return "p" + "".join(c if c.isalnum() else "_" for c in name) + f"_{abs(hash(name)) % 10**8}"


def torch_graph(model: onnx.ModelProto, what: str = "model"):
    """A :class:`torch.nn.Module` running ``model`` (see :data:`OPS`); the float initializers read as weights and
    biases of Conv/Gemm/MatMul (and BatchNormalization's scale/bias) are its parameters, by their ONNX names in
    ``module.param_names``.

    Raises:
        RecoveryError: an op outside :data:`OPS`, a non-default domain, or a graph with subgraphs.
    """
    import onnx
    import torch
    import torch.nn as nn
    from onnx import numpy_helper

    ops = _ops()
    for n in model.graph.node:
        if n.domain not in ("", "ai.onnx") or n.op_type not in OPS:
            op = f"{n.domain}.{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
            raise RecoveryError(f"recover: {what} has op {op} (node {n.name or '?'}), which the ONNX->PyTorch "
                                f"converter does not support; supported: {', '.join(OPS)}")
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
            raise RecoveryError(f"recover: {what} has control flow ({n.op_type} node {n.name}), which recovery does not support")
    trainable: set[str] = set()
    inits = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        idx = (1, 2) if n.op_type in WEIGHTED else (1, 2) if n.op_type == "BatchNormalization" else ()
        for i in idx:
            if len(n.input) > i and n.input[i] in inits and inits[n.input[i]].data_type == onnx.TensorProto.FLOAT:
                trainable.add(n.input[i])

    class TorchGraph(nn.Module):
        def __init__(self):
            super().__init__()
            self.params = nn.ParameterDict()
            self.param_names: dict[str, str] = {}  # onnx name -> key
            self.consts: dict[str, torch.Tensor] = {}
            for name, t in inits.items():
                arr = numpy_helper.to_array(t)
                tensor = torch.from_numpy(np.array(arr, copy=True))
                if name in trainable:
                    key = _safe(name)
                    self.params[key] = nn.Parameter(tensor)
                    self.param_names[name] = key
                else:
                    self.consts[name] = tensor
            self.nodes = []
            for n in model.graph.node:
                a = _attrs(n)
                if n.op_type == "Constant":
                    val = next(iter(n.attribute))
                    arr = numpy_helper.to_array(val.t) if val.name == "value" else np.asarray(
                        onnx.helper.get_attribute_value(val), np.float32 if "float" in val.name else np.int64)
                    self.consts[n.output[0]] = torch.from_numpy(np.array(arr, copy=True))
                    continue
                self.nodes.append((n.op_type, list(n.input), list(n.output), a, ops[n.op_type]))
            self.inputs = [i.name for i in model.graph.input if i.name not in inits]
            self.outputs = [o.name for o in model.graph.output]
            self.weight_quant: dict[str, Callable] = {}  # onnx weight name -> fake-quant function

        def to(self, *args, **kwargs):
            out = super().to(*args, **kwargs)
            self.consts = {k: v.to(*args, **kwargs) for k, v in self.consts.items()}
            return out

        def value(self, name: str):
            key = self.param_names.get(name)
            if key is None:
                return None
            w = self.params[key]
            q = self.weight_quant.get(name)
            return q(w) if q is not None else w

        def base_env(self, names=None) -> dict[str, Any]:
            """Constants and the (fake-quantized) values of the weights ``names`` (None: all)."""
            env: dict[str, Any] = dict(self.consts)
            for name in self.param_names if names is None else names:
                env[name] = self.value(name)
            return env

        def run_nodes(self, env: dict[str, Any], start: int = 0, stop: int | None = None,
                      keep: tuple[str, ...] = ()) -> dict[str, Any]:
            """Run ``nodes[start:stop]`` on ``env`` (tensor name -> value, updated); returns the ``keep`` ones."""
            kept = {}
            for _op, ins, outs, a, fn in self.nodes[start:stop]:
                args = [env[i] if i else None for i in ins]
                while args and args[-1] is None:
                    args.pop()
                y = fn(args, a)
                env[outs[0]] = y
                if outs[0] in keep:
                    kept[outs[0]] = y
            return kept

        def forward(self, *xs, keep: tuple[str, ...] = ()):
            env = self.base_env()
            env.update(zip(self.inputs, xs))
            kept = self.run_nodes(env, keep=keep)
            return [env[o] for o in self.outputs], kept

    return TorchGraph()


# --------------------------------------------------------------------------- LSQ fake-quant


def _channel_axis(op: str, attrs: dict, ndim: int) -> int:
    if op == "Gemm":
        return 0 if attrs.get("transB", 0) else 1
    if op == "MatMul":
        return ndim - 1
    return 0


class _Lsq:
    """Symmetric per-channel fake quantizer with a learned scale (LSQ, Esser et al. 2020)."""

    def __init__(self, w, bits: int, axis: int):
        import torch

        self.bits = bits
        self.qmax = 2 ** (bits - 1) - 1
        self.axis = axis
        self.shape = [1] * w.dim()
        self.shape[axis] = -1
        amax = w.detach().abs().amax(dim=[d for d in range(w.dim()) if d != axis]).clamp_min(1e-8)
        self.scale = torch.nn.Parameter((amax / self.qmax).clone())
        self.grad_scale = 1.0 / math.sqrt(w.numel() / w.shape[axis] * self.qmax)

    def __call__(self, w):
        s = self.scale * self.grad_scale + (self.scale - self.scale * self.grad_scale).detach()
        s = s.clamp_min(1e-8).reshape(self.shape)
        x = (w / s).clamp(-self.qmax, self.qmax)
        return ((x.round() - x).detach() + x) * s  # straight-through rounding

    def codes(self, w):
        s = self.scale.detach().clamp_min(1e-8).reshape(self.shape)
        return (w.detach() / s).clamp(-self.qmax, self.qmax).round(), s


# --------------------------------------------------------------------------- augmentation


def _augment(xs: list, image: list[bool], gen, flips: list[bool], size: int | None = None):
    """The same random crop/shift, flip and brightness/contrast per sample for every image input, resampled to
    ``size`` x ``size`` when given."""
    import torch
    import torch.nn.functional as F

    out = list(xs)
    for i, (x, is_img) in enumerate(zip(xs, image)):
        if not is_img:
            continue
        n = x.shape[0]
        scale = torch.empty(n, device=x.device).uniform_(0.7, 1.0, generator=gen)
        tx = (torch.rand(n, device=x.device, generator=gen) * 2 - 1) * (1 - scale + 0.1)
        ty = (torch.rand(n, device=x.device, generator=gen) * 2 - 1) * (1 - scale + 0.1)
        sx = scale
        if flips[i]:
            sx = torch.where(torch.rand(n, device=x.device, generator=gen) < 0.5, -scale, scale)
        theta = torch.zeros(n, 2, 3, device=x.device)
        theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = sx, scale, tx, ty
        shape = list(x.shape) if size is None else [*x.shape[:2], size, size]
        grid = F.affine_grid(theta, shape, align_corners=False)
        y = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        mean = y.mean(dim=(1, 2, 3), keepdim=True)
        std = y.std(dim=(1, 2, 3), keepdim=True)
        contrast = torch.empty(n, 1, 1, 1, device=x.device).uniform_(0.8, 1.2, generator=gen)
        bright = torch.empty(n, 1, 1, 1, device=x.device).uniform_(-0.1, 0.1, generator=gen) * std
        out[i] = (y - mean) * contrast + mean + bright
    return out


# --------------------------------------------------------------------------- recovery


def _busy_cores(cores: int, window_s: float = 0.3) -> int:
    """Cores other work keeps busy now: the non-idle share of CPU time over a short window while this process
    sleeps (``/proc/stat``); elsewhere the 1-minute load average, which also counts this process's own recent work."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        return vals[3] + (vals[4] if len(vals) > 4 else 0), sum(vals)  # idle + iowait, total

    try:
        i0, t0 = sample()
        time.sleep(window_s)
        i1, t1 = sample()
        all_cores = os.cpu_count() or cores
        busy = (1 - (i1 - i0) / max(t1 - t0, 1)) * all_cores
        return int(round(max(0.0, busy - (all_cores - cores))))  # cores outside our affinity do not count
    except (OSError, ValueError, IndexError):
        try:
            return int(round(os.getloadavg()[0]))
        except (AttributeError, OSError):
            return 0


def _threads() -> int:
    """The cores this process may use that are not busy: on a shared machine, torch threads that wait for cores
    other jobs hold cost more than they bring (MobileNetV2 steps on 2 cores with a load of 5: 0.8 s with one thread,
    4.7 s with two)."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, cores - _busy_cores(cores)))


def _pick_features(teacher, student, probe: list, limit: int) -> list[str]:
    """Up to ``limit`` intermediate tensors with the same name and shape in both graphs, spread over the depth,
    block outputs (Add) first."""
    import torch

    cand = [outs[0] for op, _, outs, _, _ in student.nodes if op in ("Add", "Clip", "Relu", "Conv", "HardSwish")]
    tnames = {outs[0] for _, _, outs, _, _ in teacher.nodes}
    cand = [c for c in cand if c in tnames and c not in student.outputs]
    if not cand or limit <= 0:
        return []
    with torch.no_grad():
        _, ts = teacher(*probe, keep=tuple(cand))
        _, ss = student(*probe, keep=tuple(cand))
    same = [c for c in cand if c in ts and c in ss and ts[c].shape == ss[c].shape and ts[c].dim() >= 2]
    ops = {outs[0]: op for op, _, outs, _, _ in student.nodes}
    adds = [c for c in same if ops[c] == "Add"]
    pool = adds if len(adds) >= limit else same
    if len(pool) <= limit:
        return pool
    idx = np.linspace(0, len(pool) - 1, limit + 1)[1:].round().astype(int)  # deeper ones: the last always
    return [pool[i] for i in sorted(set(idx.tolist()))]


def _is_logits(t) -> bool:
    return t.dim() == 2 and t.shape[1] > 1


def _agreement_np(ref: np.ndarray, out: np.ndarray) -> float | None:
    if ref.ndim != 2 or ref.shape[1] < 2:
        return None
    return float(np.mean(ref.argmax(1) == out.argmax(1)))


def _downsample(curve: list[float], points: int = 50) -> list[float]:
    if len(curve) <= points:
        return [round(v, 6) for v in curve]
    edges = np.linspace(0, len(curve), points + 1).astype(int)
    return [round(float(np.mean(curve[a:b])), 6) for a, b in zip(edges[:-1], edges[1:])]


def _cuts(net) -> list[int]:
    """Indices ``i`` of nodes after which exactly one computed tensor is live (``nodes[i]``'s output): the
    boundaries between blocks (after each residual Add, not inside a residual block)."""
    nodes = net.nodes
    made = {outs[0]: i for i, (_, _, outs, _, _) in enumerate(nodes)}
    last: dict[str, int] = {}
    for i, (_, ins, _, _, _) in enumerate(nodes):
        for t in ins:
            if t in made or t in net.inputs:
                last[t] = i
    for o in net.outputs:
        last[o] = len(nodes)
    cuts = []
    for i, (_, _, outs, _, _) in enumerate(nodes[:-1]):
        live = [t for t, j in last.items() if j > i and (made.get(t, -1) <= i)]
        if live == [outs[0]]:
            cuts.append(i)
    return cuts


def _segments(tnet, snet, probe: list, min_layers: int = 3) -> list[tuple[int, int, int, int, str | None]]:
    """Blocks both graphs share: ``(s_start, s_stop, t_start, t_stop, tensor)`` node ranges of the student and
    the teacher ending at the same tensor (same name and shape in both; None: the graph outputs), each with
    trainable weights.  One segment (the whole graph) when the graphs share no block boundary."""
    import torch

    s_cuts, t_cuts = _cuts(snet), _cuts(tnet)
    t_at = {tnet.nodes[i][2][0]: i for i in t_cuts}
    names = [snet.nodes[i][2][0] for i in s_cuts if snet.nodes[i][2][0] in t_at]
    if names:
        with torch.no_grad():
            _, ts = tnet(*probe, keep=tuple(names))
            _, ss = snet(*probe, keep=tuple(names))
        names = [t for t in names if t in ts and t in ss and ts[t].shape == ss[t].shape]
    s_at = {snet.nodes[i][2][0]: i for i in s_cuts}
    ends, last_t = [], -1
    for t in names:
        if t_at[t] > last_t:  # in the same order in both graphs
            ends.append((s_at[t] + 1, t_at[t] + 1, t))
            last_t = t_at[t]
    ends.append((len(snet.nodes), len(tnet.nodes), None))

    def weighted(a: int, b: int) -> int:
        return sum(1 for op, ins, _, _, _ in snet.nodes[a:b] if any(i in snet.param_names for i in ins))

    # atomic pieces between shared boundaries; a piece without weights (an activation, a pool) joins the piece
    # before it, so blocks end after their activation, not on pre-activation values
    pieces: list[list] = []
    s0 = t0 = 0
    for s1, t1, t in ends:
        if pieces and not weighted(s0, s1):
            pieces[-1][1], pieces[-1][3], pieces[-1][4] = s1, t1, t
        else:
            pieces.append([s0, s1, t0, t1, t])
        s0, t0 = s1, t1
    # then pieces are merged until each block holds at least `min_layers` weighted layers (a residual block of
    # MobileNetV2 is one piece of three; its blocks without a skip are three pieces of one)
    segs: list[tuple[int, int, int, int, str | None]] = []
    cur: list | None = None
    for piece in pieces:
        if cur is None:
            cur = list(piece)
        else:
            cur[1], cur[3], cur[4] = piece[1], piece[3], piece[4]
        if weighted(cur[0], cur[1]) >= min_layers:
            segs.append(tuple(cur))
            cur = None
    if cur is not None:
        if segs and weighted(cur[0], cur[1]) < min_layers:
            last = segs.pop()
            cur[0], cur[2] = last[0], last[2]
        segs.append(tuple(cur))
    return segs


def _output_loss(t_out: list, s_out: list, temperature: float):
    """KL divergence (temperature ``T``, scaled by T^2) on logits, normalised MSE on other float outputs."""
    import torch
    import torch.nn.functional as F

    loss = torch.zeros((), device=s_out[0].device)
    for to, so in zip(t_out, s_out):
        if not to.is_floating_point():
            continue
        if _is_logits(to):
            T = temperature
            loss = loss + F.kl_div(F.log_softmax(so / T, 1), F.log_softmax(to / T, 1), reduction="batchmean",
                                   log_target=True) * T * T
        else:
            loss = loss + F.mse_loss(so, to) / to.pow(2).mean().clamp_min(1e-12)
    return loss


def _block_phase(tnet, snet, xs: list, masks: dict, quant: dict, *, steps: int, lr: float, batch_size: int,
                 time_budget_s: float | None, temperature: float, seed: int, say) -> dict[str, Any]:
    """Block-wise reconstruction (BRECQ-style, on weights): for each block in order, its student weights are
    trained for ``steps`` Adam steps (cosine decay) so that the block's output on the *student's* input to it
    matches the teacher's output of the same block on the teacher's input (normalised MSE; KL on logits), masks
    fixed.  Local targets converge in far fewer steps than end-to-end distillation and do not drift from the
    original function on data they were not fitted on.  Returns what the record keeps."""
    import torch

    t_start = time.perf_counter()
    probe = [x[:2] for x in xs]
    segs = _segments(tnet, snet, probe)
    n = len(xs[0])
    bs = max(1, min(batch_size, n))
    gen = torch.Generator().manual_seed(seed)
    chunk = 32

    def run(net, env_in: dict, a: int, b: int, want: list[str], grad: bool):
        # only this block's weights: quantizing every weight of the model per block step is wasted work
        env = net.base_env([i for _, ins, _, _, _ in net.nodes[a:b] for i in ins if i in net.param_names])
        # depthwise convolutions run 2-4x faster channels-last on CPU
        env.update({k2: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v
                    for k2, v in env_in.items()})
        with torch.set_grad_enabled(grad):
            net.run_nodes(env, a, b)
        return [env[w] for w in want]

    # the tensors entering each block: graph inputs first, then the previous block's output
    t_in = dict(zip(tnet.inputs, xs))
    s_in = dict(zip(snet.inputs, xs))
    rows = []
    steps_done = 0
    for k, (s0, s1, t0, t1, tensor) in enumerate(segs):
        want = [tensor] if tensor is not None else list(snet.outputs)
        s_need = sorted({i for _, ins, _, _, _ in snet.nodes[s0:s1] for i in ins} & set(s_in))
        t_need = sorted({i for _, ins, _, _, _ in tnet.nodes[t0:t1] for i in ins} & set(t_in))
        # teacher targets of this block, in chunks
        with torch.no_grad():
            t_out = [torch.cat(v) for v in zip(*[run(tnet, {k2: t_in[k2][i:i + chunk] for k2 in t_need}, t0, t1, want, False)
                                                 for i in range(0, n, chunk)])]
        weights = sorted({i for _, ins, _, _, _ in snet.nodes[s0:s1] for i in ins if i in snet.param_names})
        params = [snet.params[snet.param_names[w]] for w in weights]
        qscales = [quant[w].scale for w in weights if w in quant]
        left = None if time_budget_s is None else time_budget_s - (time.perf_counter() - t_start)
        planned = steps
        losses = []
        if params:
            opt = torch.optim.Adam([*params, *qscales], lr=lr)
            times = []
            for step in range(planned):
                if left is not None and times:
                    per = float(np.median(times[-5:]))
                    share = left / max(len(segs) - k, 1)
                    planned = min(planned, max(step + 1, int(share / max(per, 1e-9))))
                    if step >= planned:
                        break
                c0 = time.perf_counter()
                idx = torch.randint(0, n, (bs,), generator=gen)
                pred = run(snet, {k2: s_in[k2][idx] for k2 in s_need}, s0, s1, want, True)
                loss = _output_loss([t[idx] for t in t_out], pred, temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                for w in weights:
                    if w in masks and snet.params[snet.param_names[w]].grad is not None:
                        snet.params[snet.param_names[w]].grad.mul_(masks[w])
                opt.step()
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * min((step + 1) / max(planned, 1), 1.0)))
                with torch.no_grad():
                    for w in weights:
                        if w in masks:
                            snet.params[snet.param_names[w]].mul_(masks[w])
                losses.append(float(loss.detach()))
                times.append(time.perf_counter() - c0)
            steps_done += len(losses)
        # the student's input to the next block: its own output (upstream errors included)
        with torch.no_grad():
            s_out = [torch.cat(v) for v in zip(*[run(snet, {k2: s_in[k2][i:i + chunk] for k2 in s_need}, s0, s1, want, False)
                                                 for i in range(0, n, chunk)])]
        if tensor is not None:
            t_in, s_in = {tensor: t_out[0]}, {tensor: s_out[0]}
        rows.append([tensor or "outputs", len(losses), round(losses[0], 5) if losses else None,
                     round(float(np.mean(losses[-5:])), 5) if losses else None])
        if say is not None:
            say(k + 1, len(segs), losses[-1] if losses else 0.0)
    return {"blocks": len(segs), "steps": steps_done, "time_s": round(time.perf_counter() - t_start, 2),
            "losses": rows}


def _better(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether checkpoint score ``a`` = (top-1 agreement, -relative output noise) beats ``b``: by output noise.
    On a few dozen validation samples agreement moves in steps of 1/m and swings by several of them between
    checkpoints that are equally close to the teacher; the noise is the steadier measure of closeness (measured on
    MobileNetV2: agreement 0.734 -> 0.797 on 64 validation crops while the noise rose 0.061 -> 0.108 and held-out
    SNR fell 12.4 -> 9.8 dB)."""
    return a[1] > b[1]


def recover(teacher: onnx.ModelProto, student: onnx.ModelProto, calib: CalibrationData, *,
            labels: np.ndarray | None = None, steps: int = 300, lr: float = 1e-4, batch_size: int = 32,
            time_budget_s: float | None = None, quantize: dict[str, int] | None = None, augment: bool = True,
            temperature: float = 2.0, features: int = 4, feature_weight: float = 1.0, ce_weight: float = 1.0,
            train_resolution: int | Sequence[int] | None = None, progress: Callable[[int, int, float], None] | None = None,
            seed: int = 0, device: str | None = None, threads: int | None = None,
            eval_samples: int = 64, checkpoints: int = 8, validation: CalibrationData | None = None,
            block_steps: int = 0, block_share: float = 0.5) -> RecoveryResult:
    """Fine-tune ``student`` (a compressed copy of ``teacher``) to reproduce ``teacher`` on ``calib``.

    Args:
        teacher: the original model (not modified).
        student: the compressed model (same inputs and outputs; not modified).
        calib: training samples (stacked layout); its labels are used when ``labels`` is None.
        labels: class labels of the samples: adds a cross-entropy term.
        steps: optimizer steps (Adam, cosine decay from ``lr``).
        lr: peak learning rate.
        batch_size: samples per step.
        time_budget_s: stop once the next step would end past this many seconds (the record says so).
        quantize: weight name (or ``"*"``: every Conv/Gemm/MatMul weight) -> bits of a learned per-channel
            fake-quant grid (LSQ); the exported weights lie on it.
        augment: random crop/shift, flips and brightness/contrast on image inputs.
        temperature: distillation temperature of the KL term.
        features: intermediate tensors matched (same name and shape in both graphs); 0: logits only.
        feature_weight: weight of the feature term.
        ce_weight: weight of the cross-entropy term (labels only).
        train_resolution: train on image crops resampled to this side (fully convolutional models: cheaper steps;
            the teacher sees the same crops); a sequence: progressive resizing, each side for an equal share of the
            run (of the steps, or of the time budget when that ends first), e.g. ``(128, 224)`` ends at the size the
            model is evaluated at; None: the data's own size.
        progress: called as ``progress(step, steps, loss)`` after every step.
        seed: seeds sampling, augmentation and torch.
        device: "cpu" or "cuda"; None: CUDA when available.
        threads: torch CPU threads; None: the cores this process may use that other work leaves idle
            (:func:`_busy_cores`).
        eval_samples: validation samples held out of ``calib`` when ``validation`` is None: the last this many
            (at most a quarter of them; none when fewer than 16 samples, then the first training samples score).
        checkpoints: the student is scored against the teacher on the validation samples before training and this
            many times during it (evenly over the run); the weights closest to the teacher there (lowest relative
            output noise, see :func:`_better`) are kept, so fine-tuning cannot end further from it than it started.
            0: the last weights.
        block_steps: first, block-wise reconstruction: each block shared by both graphs (the nodes between two
            points where one tensor of the same name and shape is live in both) is trained this many steps to
            reproduce the teacher's block output from the student's own input to it; kept only when it scores better
            on the validation samples; end-to-end distillation then continues from the better weights.  0: none.
        block_share: of ``time_budget_s``, the share the block phase may use (the rest is end-to-end).
        validation: samples to score checkpoints and the record's before/after agreement on (not trained on);
            None: held out of ``calib``.  Samples a post-training re-fit was solved on flatter the start: hold those
            out of neither.

    Returns:
        The trained student as ONNX (the student's graph with its trained weights), the record, and the learned
        scales of quantized weights.

    Raises:
        RecoveryError: an op the converter lacks, per-sample calibration data, models whose inputs or outputs
            differ, or an export that does not reproduce the trained module.
    """
    import onnx
    import torch
    import torch.nn.functional as F

    from . import fidelity

    t0 = time.perf_counter()
    c0 = time.process_time()
    if calib.per_sample:
        raise RecoveryError("recover: per-sample calibration data (inputs without a common batch axis) is not supported")
    t_in = [i.name for i in teacher.graph.input if i.name not in {t.name for t in teacher.graph.initializer}]
    s_in = [i.name for i in student.graph.input if i.name not in {t.name for t in student.graph.initializer}]
    if t_in != s_in or [o.name for o in teacher.graph.output] != [o.name for o in student.graph.output]:
        raise RecoveryError(f"recover: teacher and student differ in inputs/outputs ({t_in} vs {s_in})")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = threads or _threads()
    old_threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        tnet = torch_graph(teacher, "the teacher").to(device).eval()
        snet = torch_graph(student, "the student").to(device).train()
        for p in tnet.parameters():
            p.requires_grad_(False)
        feeds = calib.feeds()
        xs = [torch.from_numpy(np.ascontiguousarray(feeds[name])).to(device) for name in s_in]
        n = len(xs[0])
        y = labels if labels is not None else calib.labels
        y_t = torch.from_numpy(np.asarray(y, np.int64)[:n]).to(device) if y is not None else None
        # validation: scores checkpoints; never trained on
        if validation is not None:
            eval_data, val_desc = validation, "given"
        elif n >= 16 and eval_samples > 0:
            m_val = min(eval_samples, n // 4)
            eval_data = calib.subset(m_val, start=n - m_val)
            n -= m_val
            xs = [x[:n] for x in xs]
            y_t = y_t[:n] if y_t is not None else None
            val_desc = f"the last {m_val} calibration samples, held out of training"
        else:
            eval_data, val_desc = calib.subset(min(eval_samples, n)), "the first training samples (too few to hold out)"
        vfeeds = eval_data.feeds()
        vx = [torch.from_numpy(np.ascontiguousarray(vfeeds[name])).to(device) for name in s_in]
        m_eval = len(vx[0])
        image = [x.dim() == 4 and x.is_floating_point() and x.shape[2] >= 4 and x.shape[3] >= 4 for x in xs]
        flips = [x.shape[2] >= 32 and x.shape[3] >= 32 for x in xs]
        aug_desc = []
        if augment and any(image):
            aug_desc = ["random resized crop/shift (scale 0.7-1)", "brightness/contrast jitter (+-0.1 std, x0.8-1.2)"]
            if any(f for f, i in zip(flips, image) if i):
                aug_desc.insert(1, "horizontal flip")
        bs = max(1, min(batch_size, n))
        channels_last = device == "cpu" and any(image)  # depthwise convs run 2-4x faster in it on CPU
        sides = ([] if not train_resolution else [int(train_resolution)] if isinstance(train_resolution, int)
                 else [int(v) for v in train_resolution])
        if sides:
            aug_desc.append("trained at " + " then ".join(f"{v}x{v}" for v in sides))

        # masks: zeros of pruned weights stay zero
        node_of: dict[str, tuple[str, dict]] = {}
        for op, ins, _, a, _ in snet.nodes:
            if op in WEIGHTED and len(ins) > 1 and ins[1] in snet.param_names:
                node_of.setdefault(ins[1], (op, a))
        masks: dict[str, torch.Tensor] = {}
        for name in node_of:
            w = snet.params[snet.param_names[name]]
            zeros = (w == 0)
            frac = float(zeros.float().mean())
            if frac >= 0.01:
                masks[name] = (~zeros).to(w.dtype)
        # LSQ
        quant: dict[str, _Lsq] = {}
        for name, bits in (quantize or {}).items():
            targets = list(node_of) if name == "*" else [name]
            for tname in targets:
                if tname not in node_of:
                    raise RecoveryError(f"recover: quantize names {tname}, which is not a Conv/Gemm/MatMul weight of the student")
                op, a = node_of[tname]
                w = snet.params[snet.param_names[tname]]
                quant[tname] = _Lsq(w, int(bits), _channel_axis(op, a, w.dim()))
                snet.weight_quant[tname] = quant[tname]
        params = list(snet.parameters())
        scale_params = [q.scale for q in quant.values()]
        opt = torch.optim.Adam([{"params": params}, {"params": scale_params, "lr": lr}], lr=lr)

        gen = torch.Generator(device=device).manual_seed(seed)
        probe = [x[: min(n, 4)] for x in xs]
        feats = _pick_features(tnet, snet, probe, features)
        # onnxruntime: several times faster than eager torch on CPU
        t_eval = fidelity.run(fidelity.session(teacher, threads), eval_data)[0]
        before = _agreement_np(t_eval, fidelity.run(fidelity.session(student, threads), eval_data)[0])

        def score() -> tuple[float, float]:
            """(top-1 agreement, -relative output noise) of the student against the teacher on the validation
            samples."""
            snet.eval()
            with torch.no_grad():
                outs = [snet(*[x[i : i + bs] for x in vx])[0][0].float().cpu().numpy() for i in range(0, m_eval, bs)]
            snet.train()
            got = np.concatenate(outs)
            agree = _agreement_np(t_eval, got)
            return (agree if agree is not None else 0.0, -fidelity.relative_noise(t_eval, got))

        def snapshot() -> list:
            return [p.detach().clone() for p in [*params, *scale_params]]

        best = (score(), 0, snapshot()) if checkpoints > 0 else None
        first = (best[2] if best is not None else snapshot()) if block_steps > 0 else []
        scores: list[list[float]] = [[0, *best[0]]] if best is not None else []
        next_check = 1

        block: dict[str, Any] = {}
        if block_steps > 0:
            start_score = best[0] if best is not None else score()
            left = None if time_budget_s is None else block_share * (time_budget_s - (time.perf_counter() - t0))
            block = _block_phase(tnet, snet, xs, masks, quant, steps=block_steps, lr=lr, batch_size=bs,
                                 time_budget_s=left, temperature=temperature, seed=seed, say=None)
            sc = score()
            block.update(score_before=[round(float(v), 6) for v in start_score],
                         score_after=[round(float(v), 6) for v in sc], kept=_better(sc, start_score))
            if _better(sc, start_score):
                best = (sc, 0, snapshot()) if best is not None else None
                scores = [[0, *sc]] if best is not None else []
            else:  # the block phase made it worse on the validation samples: back to the start
                with torch.no_grad():
                    for p, saved in zip([*params, *scale_params], first):
                        p.copy_(saved)

        curve: list[float] = []
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        pos = 0
        done = 0
        stop_reason = ""
        step_times: list[float] = []
        loop_start = time.perf_counter()

        def _progress(k: int) -> float:
            """Share of the run done after ``k`` steps: of the steps, or of the time budget when that ends first."""
            frac = k / max(steps, 1)
            if time_budget_s is not None:
                frac = max(frac, (time.perf_counter() - loop_start) / max(time_budget_s - (loop_start - t0), 1e-9))
            return min(frac, 1.0)
        for step in range(steps):
            if time_budget_s is not None:
                elapsed = time.perf_counter() - t0
                est = float(np.median(step_times[-5:])) if step_times else 0.0
                if elapsed + est > time_budget_s:
                    stop_reason = f"time budget {time_budget_s:g} s reached after {done} of {steps} steps"
                    break
            s0 = time.perf_counter()
            if pos + bs > n:
                order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + step))
                pos = 0
            idx = order[pos : pos + bs].to(device)
            pos += bs
            batch = [x[idx] for x in xs]
            side = sides[min(int(_progress(done) * len(sides)), len(sides) - 1)] if sides else None
            if augment or side:
                batch = _augment(batch, image, gen, flips, side) if augment else [
                    F.interpolate(b, size=(side, side), mode="bilinear", antialias=True,
                                  align_corners=False) if im else b for b, im in zip(batch, image)]
            if channels_last:
                batch = [b.contiguous(memory_format=torch.channels_last) if b.dim() == 4 else b for b in batch]
            try:
                with torch.no_grad():
                    t_out, t_feat = tnet(*batch, keep=tuple(feats))
                s_out, s_feat = snet(*batch, keep=tuple(feats))
            except RuntimeError as e:
                if side is None or all(x.shape[-1] == side for x, im in zip(xs, image) if im):
                    raise
                raise RecoveryError(f"recover: the model does not run at train_resolution {side} (not fully "
                                    f"convolutional?): {' '.join(str(e).split())[:200]}") from None
            loss = _output_loss(t_out, s_out, temperature)
            if feats:
                fl = sum(F.mse_loss(s_feat[f], t_feat[f]) / t_feat[f].pow(2).mean().clamp_min(1e-12) for f in feats)
                loss = loss + feature_weight * fl / len(feats)
            if y_t is not None and _is_logits(s_out[0]):
                loss = loss + ce_weight * F.cross_entropy(s_out[0], y_t[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for name, m in masks.items():
                g = snet.params[snet.param_names[name]].grad
                if g is not None:
                    g.mul_(m)
            opt.step()
            # cosine decay over the planned steps, or over the time budget when that ends first
            frac = _progress(done + 1)
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
            with torch.no_grad():
                for name, m in masks.items():
                    snet.params[snet.param_names[name]].mul_(m)
            curve.append(float(loss.detach()))
            done += 1
            step_times.append(time.perf_counter() - s0)
            if best is not None and (_progress(done) * checkpoints >= next_check or done == steps):
                next_check = int(_progress(done) * checkpoints) + 1
                sc = score()
                scores.append([done, *sc])
                if _better(sc, best[0]):
                    best = (sc, done, snapshot())
            if progress is not None:
                progress(done, steps, curve[-1])
        selected = done
        if best is not None and best[1] != done:
            if not scores or scores[-1][0] != done:  # stopped by the time budget between checks: score the last too
                sc = score()
                scores.append([done, *sc])
                if _better(sc, best[0]):
                    best = (sc, done, snapshot())
            if best[1] != done:
                with torch.no_grad():
                    for p, saved in zip([*params, *scale_params], best[2]):
                        p.copy_(saved)
                selected = best[1]
        snet.eval()
        # bake the fake-quant grid into the weights
        scales: dict[str, np.ndarray] = {}
        with torch.no_grad():
            for name, q in quant.items():
                w = snet.params[snet.param_names[name]]
                codes, s = q.codes(w)
                w.copy_(codes * s)
                scales[name] = s.cpu().numpy().astype(np.float32)  # broadcastable: [O, 1, 1, 1], [1, N]...
                if name in masks:
                    w.mul_(masks[name])
            snet.weight_quant.clear()
        # export: the trained weights go into the student's own graph
        out = onnx.ModelProto()
        out.CopyFrom(student)
        from onnx import numpy_helper

        for t in out.graph.initializer:
            key = snet.param_names.get(t.name)
            if key is not None:
                arr = snet.params[key].detach().cpu().numpy().astype(numpy_helper.to_array(t).dtype)
                t.CopyFrom(numpy_helper.from_array(arr, t.name))
        err = _check_export(out, snet, {k: feeds[k][: min(n, 16)] for k in s_in}, s_in, device)
        after = _agreement_np(t_eval, fidelity.run(fidelity.session(out, threads), eval_data)[0])
        for name, m in masks.items():
            w = next(numpy_helper.to_array(t) for t in out.graph.initializer if t.name == name)
            if np.any(w[m.cpu().numpy() == 0] != 0):
                raise RecoveryError(f"recover: the sparsity mask of {name} was not preserved")  # an invariant
        loss_desc = (f"{'KL(T=' + format(temperature, 'g') + ')*T^2 on logits (MSE on other outputs)'}"
                     + (f" + {feature_weight:g} * feature MSE ({len(feats)} tensors)" if feats else "")
                     + (f" + {ce_weight:g} * CE(labels)" if y_t is not None else ""))
        record = RecoveryRecord(
            steps=done, steps_planned=steps, epochs=round(done * bs / n, 3), samples=n, batch_size=bs,
            augmentation=aug_desc, labels_used=y_t is not None, loss=loss_desc,
            features_matched=feats, loss_curve=_downsample(curve), lr=lr, time_s=round(time.perf_counter() - t0, 2),
            cpu_time_s=round(time.process_time() - c0, 2),
            validation=val_desc, validation_samples=m_eval, block_phase=block,
            device=device, threads=threads if device == "cpu" else 0, seed=seed, stopped_early=bool(stop_reason),
            stop_reason=stop_reason,
            masked={k: round(1 - float(m.mean()), 4) for k, m in masks.items()},
            quantized={k: q.bits for k, q in quant.items()},
            agreement_before=before, agreement_after=after, export_max_abs_error=err,
            selected_step=selected, checkpoint_scores=[[int(s[0]), round(float(s[1]), 4), round(float(s[2]), 6)]
                                                        for s in scores])
        return RecoveryResult(out, record, scales)
    finally:
        if device == "cpu":
            torch.set_num_threads(old_threads)


def _check_export(model: onnx.ModelProto, snet, feed: dict[str, np.ndarray], names: list[str], device: str) -> float:
    """Largest |onnxruntime - torch| difference of the exported student, relative checks against its scale."""
    import torch

    from .fidelity import fixed_batch, session

    sess = session(model)
    fb = fixed_batch(sess)
    if fb:  # a model exported with a fixed batch (torch.onnx.export without dynamic axes) takes exactly that many
        feed = {k: v[:fb] for k, v in feed.items()}
    ref = sess.run(None, feed)
    with torch.no_grad():
        got = snet(*[torch.from_numpy(np.ascontiguousarray(feed[k])).to(device) for k in names])[0]
    err = 0.0
    for r, g in zip(ref, got):
        g = g.detach().cpu().numpy()
        if r.shape != g.shape:
            raise RecoveryError(f"recover: exported output shape {list(r.shape)} differs from torch's {list(g.shape)}")
        if r.dtype.kind == "f":
            e = float(np.max(np.abs(r - g))) if r.size else 0.0
            tol = 1e-3 * max(float(np.max(np.abs(r))) if r.size else 0.0, 1.0)
            if not e <= tol:
                raise RecoveryError(f"recover: the exported model differs from the trained module by {e:.3g} (> {tol:.3g})")
            err = max(err, e)
    return err


def is_n_m(w: np.ndarray, axis: int = 1, n: int = 2, m: int = 4) -> bool:
    """Whether every group of ``m`` consecutive entries of ``w`` along ``axis`` has at most ``n`` non-zeros."""
    a = np.moveaxis(w, axis, -1)
    if a.shape[-1] % m:
        return False
    groups = a.reshape(*a.shape[:-1], a.shape[-1] // m, m)
    return bool(np.all(np.count_nonzero(groups, axis=-1) <= n))


def grid_report(model: onnx.ModelProto, scales: dict[str, np.ndarray], bits: dict[str, int]) -> dict[str, dict[str, float]]:
    """For each quantized weight: the largest distance of its values from the learned grid (in steps), the
    distinct values in its most varied channel, and the fraction of channels a per-channel absmax quantizer
    reproduces exactly (largest code = qmax)."""
    from onnx import numpy_helper

    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {}
    for name, s in scales.items():
        w = arrays[name]
        qmax = 2 ** (bits[name] - 1) - 1
        axis = next((i for i, d in enumerate(s.shape) if d != 1), 0)
        q = w / s
        off = float(np.max(np.abs(q - np.round(q)))) if q.size else 0.0
        per = np.moveaxis(np.round(q), axis, 0).reshape(w.shape[axis], -1)
        distinct = max(len(np.unique(r)) for r in per)
        exact = float(np.mean(np.max(np.abs(per), axis=1) == qmax))
        out[name] = {"max_off_grid": off, "max_distinct": distinct, "absmax_exact": exact}
    return out
