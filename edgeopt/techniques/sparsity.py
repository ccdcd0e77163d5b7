"""Pruning patterns: 2:4 (two of every four weights along the reduction axis), unstructured pruning (both with the
zeros chosen by their effect on the layer's output and the kept weights re-fitted on calibration data, SparseGPT-style),
and channel pruning (whole output channels removed, consumers re-fitted on calibration data)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..technique import ApplyContext, SimContext, Technique
from . import scoped_pass

if TYPE_CHECKING:  # pragma: no cover
    import onnx

#: Fractions planned (and measured by sensitivity) for the patterns whose ratio is free.
CHANNEL_RATIO = 0.3
UNSTRUCTURED_RATIO = 0.5


def _nm(ratio: float) -> dict:
    return {"pattern": "n:m", "n": 2, "m": 4}


def _unstructured(ratio: float) -> dict:
    return {"pattern": "unstructured", "sparsity": ratio}


def _prune_simulator(config):
    def simulate(ctx: SimContext, layer: str) -> onnx.ModelProto:
        """The prune pass itself on this layer: zeros chosen by output error and the kept weights re-fitted on
        other samples than those it is judged on (``ctx.fit``)."""
        cfg = {**config(UNSTRUCTURED_RATIO), "reconstruct": True, "calib_samples": len(ctx.fit)}
        return scoped_pass(ctx, "prune", layer, cfg, ctx.fit)

    return simulate


def _prune_applier(config):
    def apply(model: onnx.ModelProto, layers: list[str], ctx: ApplyContext) -> tuple[onnx.ModelProto, str | None]:
        """With calibration data, the output-aware re-fit (as simulated); without, magnitude pruning."""
        from ..passes import run_pass

        cfg = {**config(ctx.ratio), "nodes": layers, "reconstruct": ctx.calib is not None}
        res = run_pass("prune", model, cfg, ctx.calib, evaluate=False)
        return res.model, res.report.summary()

    return apply


def _simulate_channel(ctx: SimContext, layer: str) -> onnx.ModelProto:
    """The channel-pruning pass (with its least-squares reconstruction) on this layer, fitted on other samples than
    those it is judged on, or it looks perfect."""
    return scoped_pass(ctx, "channel_prune", layer, {"ratio": CHANNEL_RATIO, "calib_samples": len(ctx.fit)}, ctx.fit)


def _apply_channel(model: onnx.ModelProto, layers: list[str], ctx: ApplyContext) -> tuple[onnx.ModelProto, str | None]:
    from ..errors import EdgeoptError
    from ..passes import run_pass

    if ctx.calib is None:
        raise EdgeoptError("channel pruning reconstructs layers from calibration data: give --calib")
    cfg = {"nodes": layers, "ratio": ctx.ratio}
    if ctx.backend_options.get("channel_multiple"):  # what the backend's fast kernels want
        cfg["round_to"] = int(ctx.backend_options["channel_multiple"])
    res = run_pass("channel_prune", model, cfg, ctx.calib, evaluate=False)
    return res.model, res.report.summary()


def _nm_storage(weights: int, ratio: float, compresses: bool) -> tuple[float, float]:
    return 0.5, weights * 0.5 * 2 / 8  # half the weights kept, a 2-bit index per kept weight


def _unstructured_storage(weights: int, ratio: float, compresses: bool) -> tuple[float, float]:
    return (1.0 - ratio, weights / 8) if compresses else (1.0, 0.0)  # kept values + a bitmask, or dense zeros


def _channel_storage(weights: int, ratio: float, compresses: bool) -> tuple[float, float]:
    return 1.0 - ratio, 0.0


#: The planner's priors for the share of a pruned layer's post-training noise left after recovery (``edgeopt.recover``:
#: block-wise reconstruction, then distillation, masks fixed), measured against the post-training re-fits above by
#: scripts/bench_recovery.py on MobileNetV2 (2 shared CPU cores, 300 s each): 2:4 SNR 12.4 -> 12.7 dB (noise x0.93),
#: 50% unstructured 10.7 -> 10.9 dB (x0.95), channel 50% unchanged at 11.8 dB (on the digits CNN, from a start
#: without reconstruction, agreement +0.3).  Priors only: a build keeps the recovered model only when it beats
#: post-training on held-out samples, and accuracy control measures the artifact.
RECOVERED_NM = 0.93
RECOVERED_UNSTRUCTURED = 0.95
RECOVERED_CHANNEL = 0.95

TECHNIQUES = [
    Technique(name="2:4", kind="sparsity", description="two of every four weights along the reduction axis kept "
              "(sparse tensor cores)", ratio=0.5, storage=_nm_storage,
              simulate=_prune_simulator(_nm), apply=_prune_applier(_nm), recovered_noise=RECOVERED_NM),
    Technique(name="unstructured", kind="sparsity", description="the smallest weights set to zero",
              ratio=UNSTRUCTURED_RATIO, storage=_unstructured_storage,
              simulate=_prune_simulator(_unstructured), apply=_prune_applier(_unstructured),
              recovered_noise=RECOVERED_UNSTRUCTURED),
    Technique(name="channel", kind="sparsity", description="whole output channels removed, consumers re-fitted",
              ratio=CHANNEL_RATIO, removes_channels=True, storage=_channel_storage,
              simulate=_simulate_channel, apply=_apply_channel, recovered_noise=RECOVERED_CHANNEL),
]
