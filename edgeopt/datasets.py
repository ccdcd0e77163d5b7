"""The embedded default model and its data (scikit-learn's digits, shipped in the package).

``scripts/make_default_model.py`` produced both files; see its docstring for the split.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_MODEL = DATA_DIR / "digits_cnn.onnx"
DIGITS = DATA_DIR / "digits.npz"

Split = Literal["train", "calib", "test", "all"]


@lru_cache(maxsize=1)
def _digits():
    import numpy as np

    with np.load(DIGITS, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def digits(split: Split = "test"):
    """(images float32 [N,1,8,8] in [0,1], labels int64 [N]) for one split of the digits data."""
    import numpy as np

    d = _digits()
    idx = np.arange(len(d["labels"])) if split == "all" else d[f"{split}_idx"]
    x = (d["images"][idx].astype(np.float32) / 16.0)[:, None, :, :]
    return x, d["labels"][idx]


def default_model_path() -> Path:
    return DEFAULT_MODEL
