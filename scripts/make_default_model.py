"""Train the embedded default model: a small CNN on scikit-learn's digits.

Writes two files into ``edgeopt/data/``:

* ``digits_cnn.onnx``: the trained network, input ``image`` float32 [N,1,8,8]
  scaled to [0, 1], output ``logits`` [N,10]; one file, opset 17.
* ``digits.npz``: the 1797 digit images (uint8, 0..16, [N,8,8]), labels and
  the fixed split used for training (``train_idx``), calibration
  (``calib_idx``, a subset of the training images) and accuracy (``test_idx``).

Needs torch (``pip install torch==2.13.0``, a CPU build) and scikit-learn.
Deterministic for a given torch build: seeds are fixed and it uses one thread.
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np

DATA = pathlib.Path(__file__).resolve().parents[1] / "edgeopt" / "data"


def build_model():
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 4x4
        nn.Conv2d(32, 64, 3, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 2x2
        nn.Flatten(),
        nn.Linear(64 * 2 * 2, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=80)
    ap.add_argument("--out", type=pathlib.Path, default=DATA)
    args = ap.parse_args()

    import torch
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    torch.set_num_threads(1)
    digits = load_digits()
    images = digits.images.astype(np.uint8)  # values 0..16
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(labels))
    n_test = 360
    test_idx = np.sort(order[:n_test])
    train_idx = np.sort(order[n_test:])
    calib_idx = np.sort(rng.choice(train_idx, 256, replace=False))

    x = torch.from_numpy(images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(labels)
    model = build_model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs)
    xtr, ytr = x[train_idx], y[train_idx]
    for _epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(ytr))
        for i in range(0, len(perm), 64):
            b = perm[i : i + 64]
            # light augmentation: random 1-pixel shifts
            xb = xtr[b]
            dx, dy = (int(v) for v in torch.randint(-1, 2, (2,)))
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(model(xb), ytr[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x[test_idx]).argmax(1) == y[test_idx]).float().mean().item()
    print(f"test accuracy {acc:.4f} on {n_test} held-out digits")
    if acc < 0.97:
        raise SystemExit(f"training failed: accuracy {acc:.4f} < 0.97")

    args.out.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model,
        (torch.zeros(1, 1, 8, 8),),
        str(args.out / "digits_cnn.onnx"),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    np.savez_compressed(
        args.out / "digits.npz",
        images=images,
        labels=labels,
        train_idx=train_idx,
        calib_idx=calib_idx,
        test_idx=test_idx,
    )
    print(f"wrote {args.out / 'digits_cnn.onnx'} and {args.out / 'digits.npz'}")


if __name__ == "__main__":
    main()
