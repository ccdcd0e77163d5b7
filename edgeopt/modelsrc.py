"""Models given as Python objects, turned into the ONNX file every stage reads.

* an ``onnx.ModelProto``: saved as is;
* a ``torch.nn.Module`` with example inputs, or a ``torch.export.ExportedProgram`` (its own example inputs unless
  others are given): exported with ``torch.onnx.export`` (the TorchScript exporter, ``dynamo=False``: it needs no
  onnxscript), opset :data:`OPSET`, in eval mode without gradients, static shapes (the example inputs' shapes, batch
  included), inputs named ``input`` (one) or ``input_0``, ``input_1``, ... unless ``input_names`` says otherwise.
  The export is checked before anything is built from it: the ONNX checker, then onnxruntime's outputs against
  torch's on the example inputs (refused in one line with the largest difference when they disagree).

What was done is returned as a :class:`~edgeopt.types.ModelSource`, which the build records in the manifest.
torch is imported only when a torch object is passed (:func:`is_torch_model` looks at ``sys.modules``).
"""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .errors import EdgeoptError, ModelLoadError
from .types import ModelSource

#: the ONNX opset torch models are exported with (pinned: a torch upgrade must not change artifacts silently)
OPSET = 17
EXPORTER = "torch.onnx.export (TorchScript, dynamo=False)"
#: onnxruntime's outputs may differ from torch's by at most ATOL + RTOL * (largest absolute torch output)
ATOL = 1e-4
RTOL = 1e-3


def is_torch_model(obj: Any) -> bool:
    """Whether ``obj`` is a ``torch.nn.Module`` or ``torch.export.ExportedProgram`` (without importing torch: an
    object of torch's can only exist once torch is imported)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    return isinstance(obj, (torch.nn.Module, torch.export.ExportedProgram))


def _is_model_proto(obj: Any) -> bool:
    onnx = sys.modules.get("onnx")
    return onnx is not None and isinstance(obj, onnx.ModelProto)


def _first_line(e: BaseException, limit: int = 240) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _file_name(name: str) -> str:
    return (re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "model")[:80] + ".onnx"


def materialize(model: Any, folder: str | Path, *, example_inputs: Any = None,
                input_names: list[str] | None = None) -> tuple[Path, ModelSource | None]:
    """The ONNX file for ``model`` and how it was made.

    Args:
        model: a path to an ONNX file (returned as is, no source), an ``onnx.ModelProto``, a ``torch.nn.Module``
            or a ``torch.export.ExportedProgram``.
        folder: where an exported or in-memory model's file is written (a run's scratch folder).
        example_inputs: a torch module's inputs: a tensor or array, or a tuple of them (batch included).
        input_names: the ONNX input names of a torch model (default ``input`` / ``input_0``, ``input_1``, ...).

    Raises:
        ModelLoadError: the export fails or its outputs disagree with torch's; an object of another type.
    """
    if isinstance(model, (str, Path)):
        if example_inputs is not None or input_names is not None:
            raise EdgeoptError("example_inputs and input_names are for torch models; an ONNX file has its own inputs")
        return Path(model), None
    folder = Path(folder)
    if _is_model_proto(model):
        if example_inputs is not None or input_names is not None:
            raise EdgeoptError("example_inputs and input_names are for torch models; an ONNX model has its own inputs")
        return _save_proto(model, folder)
    if is_torch_model(model):
        return export_torch(model, folder, example_inputs=example_inputs, input_names=input_names)
    raise ModelLoadError(f"model must be a path to an .onnx file, 'default', an onnx.ModelProto, a torch.nn.Module "
                         f"(with example_inputs=) or a torch.export.ExportedProgram, not {type(model).__name__}")


def _save_proto(model, folder: Path) -> tuple[Path, ModelSource]:
    import onnx

    from .graph import sha256_file

    name = model.graph.name or "model"
    path = folder / _file_name(name)
    try:
        if model.ByteSize() > 1_800_000_000:  # protobuf's 2 GB limit: weights beside the graph
            onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")
        else:
            onnx.save(model, str(path))
    except (ValueError, OSError) as e:
        raise ModelLoadError(f"cannot save the onnx.ModelProto {name!r}: {_first_line(e)}") from None
    return path, ModelSource(kind="onnx-proto", name=name, onnx_sha256=sha256_file(path))


class _Exportable:
    """Builds the wrapper that lets the TorchScript exporter trace an ``ExportedProgram``'s module (whose ``train()``
    raises): eval mode already, ``train()`` a no-op."""

    @staticmethod
    def wrap(graph_module):
        import torch

        class ExportedProgramModule(torch.nn.Module):
            def __init__(self, gm):
                super().__init__()
                self.gm = gm

            def train(self, mode: bool = True):
                return self

            def forward(self, *args):
                return self.gm(*args)

        return ExportedProgramModule(graph_module)


def _example_args(example_inputs: Any, what: str) -> tuple:
    import torch

    if example_inputs is None:
        raise EdgeoptError(f"{what}: give example_inputs= (a tensor, or a tuple of tensors, batch included): the "
                           "export traces the model on them and fixes the input shapes to theirs")
    items = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not items:
        raise EdgeoptError(f"{what}: example_inputs is empty")
    out = []
    for i, x in enumerate(items):
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(x))
        if not isinstance(x, torch.Tensor):
            raise EdgeoptError(f"{what}: example input {i} is a {type(x).__name__}; example inputs are tensors "
                               "(or numpy arrays)")
        out.append(x.detach().cpu())
    return tuple(out)


def _flatten(out: Any) -> list:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flatten(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flatten(v)]
    return []


def _check_size(module) -> None:
    from .memory import MemoryLimitError, limit_hint, max_memory
    from .units import fmt_bytes

    n = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    # the weights are held by torch, by the exported file's protobuf and by onnxruntime's session at once
    if 3 * n > max_memory():
        raise MemoryLimitError(f"exporting a model of {fmt_bytes(n)} of weights needs about {fmt_bytes(3 * n)}, over "
                               f"the memory limit of {fmt_bytes(max_memory())}; {limit_hint()}")


def export_torch(model: Any, folder: str | Path, *, example_inputs: Any = None,
                 input_names: list[str] | None = None) -> tuple[Path, ModelSource]:
    """Export a ``torch.nn.Module`` or ``torch.export.ExportedProgram`` to ``folder/<ClassName>.onnx`` and check it
    against torch (see the module docstring).  A module's training mode is restored afterwards.

    Raises:
        EdgeoptError: no or bad example inputs, bad input names.
        ModelLoadError: the export fails, the ONNX checker or onnxruntime refuses it, or its outputs differ from
            torch's by more than the tolerance (the message gives the largest difference).
    """
    import torch

    from .graph import sha256_file

    folder = Path(folder)
    if isinstance(model, torch.export.ExportedProgram):
        kind = "torch-exported-program"
        module = _Exportable.wrap(model.module())
        name = "ExportedProgram"
        if example_inputs is None and model.example_inputs is not None:
            args, kwargs = model.example_inputs
            if kwargs:
                raise EdgeoptError("the ExportedProgram was exported with keyword inputs; give example_inputs= as a "
                                   "tuple of tensors")
            example_inputs = tuple(args)
    else:
        kind = "torch-module"
        module = model
        name = type(model).__name__
    what = f"torch model {name}"
    args = _example_args(example_inputs, what)
    names = list(input_names) if input_names is not None else (
        ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))])
    if len(names) != len(args) or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise EdgeoptError(f"{what}: input_names {names} must be {len(args)} distinct non-empty names, one per "
                           "example input")
    _check_size(module)
    path = folder / _file_name(name)
    training = module.training
    try:
        module.eval()
        with torch.no_grad():
            try:
                reference = _flatten(module(*args))
            except Exception as e:  # noqa: BLE001 - the user's forward may raise anything
                raise EdgeoptError(f"{what} fails on the example inputs: {type(e).__name__}: {_first_line(e)}") from None
            if not reference:
                raise EdgeoptError(f"{what} returns no tensors on the example inputs")
            output_names = ["output"] if len(reference) == 1 else [f"output_{i}" for i in range(len(reference))]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    torch.onnx.export(module, args, str(path), input_names=names, output_names=output_names,
                                      opset_version=OPSET, dynamo=False, do_constant_folding=True)
                except Exception as e:  # noqa: BLE001 - the exporter raises many types
                    raise ModelLoadError(f"torch.onnx.export of {name} (opset {OPSET}) failed: {type(e).__name__}: "
                                         f"{_first_line(e)}") from None
    finally:
        module.train(training)
    diff, tol, shapes = check_export(path, args, names, [r.detach().cpu().numpy() for r in reference], what)
    source = ModelSource(kind=kind, name=name, onnx_sha256=sha256_file(path), exporter=EXPORTER,
                         torch_version=str(torch.__version__), opset=OPSET, input_names=list(shapes),
                         input_shapes=shapes, output_max_abs_diff=diff, tolerance=tol)
    return path, source


def check_export(path: Path, args: tuple, names: list[str], reference: list[np.ndarray],
                 what: str) -> tuple[float, float, dict[str, list[int]]]:
    """Check an exported file: the ONNX checker, then onnxruntime's outputs on ``args`` against ``reference``.

    Returns:
        The largest absolute difference, the tolerance, and the shapes of the inputs the graph kept (the exporter
        drops inputs the model does not use).

    Raises:
        ModelLoadError: the checker or onnxruntime refuses the file, or the outputs disagree.
    """
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(path))
    except Exception as e:  # noqa: BLE001 - onnx's checker errors have several types
        raise ModelLoadError(f"the ONNX export of {what} does not pass the ONNX checker: {_first_line(e)}") from None
    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        kept = [i.name for i in sess.get_inputs()]
        feeds = {n: a.numpy() for n, a in zip(names, args) if n in kept}
        got = sess.run(None, feeds)
    except Exception as e:  # noqa: BLE001 - onnxruntime's errors have no common base class
        raise ModelLoadError(f"onnxruntime cannot run the ONNX export of {what}: {_first_line(e)}") from None
    if len(got) != len(reference):
        raise ModelLoadError(f"the ONNX export of {what} has {len(got)} outputs, torch returns {len(reference)}")
    diff, scale = 0.0, 0.0
    for i, (g, r) in enumerate(zip(got, reference)):
        g, r = np.asarray(g), np.asarray(r)
        if g.shape != r.shape:
            raise ModelLoadError(f"the ONNX export of {what}: output {i} has shape {list(g.shape)}, torch's "
                                 f"{list(r.shape)}")
        if r.size == 0:
            continue
        g64, r64 = g.astype(np.float64), r.astype(np.float64)
        if not np.isfinite(r64).all():
            raise ModelLoadError(f"{what} gives NaN or Inf on the example inputs (output {i}); give example inputs "
                                 "it computes finite outputs on")
        d = np.abs(g64 - r64)
        diff = max(diff, float(np.nanmax(np.where(np.isfinite(d), d, np.inf))))
        scale = max(scale, float(np.abs(r64).max()))
    tol = ATOL + RTOL * scale
    if not diff <= tol:
        raise ModelLoadError(f"the ONNX export of {what} disagrees with torch on the example inputs: max abs "
                             f"difference {diff:.3g} > tolerance {tol:.3g} (onnxruntime vs torch, opset {OPSET}); "
                             "the exporter mistraced the model (data-dependent control flow?)")
    shapes = {n: [int(d) for d in a.shape] for n, a in zip(names, args) if n in kept}
    return diff, tol, shapes
