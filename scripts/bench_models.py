"""Real models x targets: does each build through the CLI a user runs, and how faithful is the artifact?

    python scripts/bench_models.py [--models digits,kws-gru,...] [--targets x86-cpu,android-mid,...] [--json out.json]

Every cell runs ``edgeopt build MODEL --target T --calib DATA --eval DATA [--labels L] -o OUT`` in a fresh process
(the command a user types; data written to disk in the documented formats) and records:

* built: backend, per-layer precisions, size; the fidelity the build measured on held-out data (the manifest's
  ``accuracy``: top-1 agreement / accuracy delta for classifiers, SNR for the rest: exact-numerics reference where
  this host is not of the target's class); for PP-OCRv4 rec also the fraction of held-out text lines whose greedy
  CTC decoding equals the original's (``text_equal``, from the artifact run here, or its exact reference);
* refused: the one-line ``error:`` the CLI printed (exit 2);
* INTERNAL: exit 1 (an edgeopt bug) or a crash: counted; the script prints FAIL when there is any.

Models (all offline): digits (embedded), mobilenetv2 (torchvision weights, ``zoo.mobilenetv2_path``), ppocr-det
(1x3x320x320), ppocr-rec (1x3x48x320), ppocr-cls (1x3x48x192; ``rapidocr-onnxruntime``), minilm (all-MiniLM-L6-v2,
``zoo.minilm_path``), kws-gru (a streaming GRU with state in/out trained here, ``zoo.kws_gru_path``).
Not a test: results depend on the host (its ISA is printed with them).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

MODELS = ("digits", "mobilenetv2", "ppocr-det", "ppocr-rec", "ppocr-cls", "minilm", "kws-gru")
TARGETS = ("x86-cpu", "x86-avx2", "android-mid", "mcu-cortex-m7", "ios", "gpu-server", "jetson-orin")


@dataclass
class Model:
    name: str
    path: Path
    kind: str  # cls | det | rec | emb
    calib: list[dict[str, np.ndarray]]  # per sample, in the model's own input shapes
    eval: list[dict[str, np.ndarray]]
    labels: np.ndarray | None = None


@dataclass
class Cell:
    model: str
    target: str
    status: str = ""  # built | refused | INTERNAL
    detail: str = ""
    fidelity: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def _per_sample(x: np.ndarray, name: str) -> list[dict[str, np.ndarray]]:
    return [{name: x[i : i + 1]} for i in range(len(x))]


def load_model(name: str, cache: Path, n_calib: int, n_eval: int) -> Model:
    import bench_planner as bp

    from edgeopt import zoo

    if name in ("digits", "mobilenetv2", "ppocr-det", "ppocr-rec"):
        c = bp.load_case(name, n_calib, n_eval, 320, cache)
        kind = {"cls": "cls", "det": "det", "rec": "rec"}[c.kind]
        return Model(name, c.path, kind, _per_sample(c.calib, c.input), _per_sample(c.eval, c.input), c.labels)
    if name == "ppocr-cls":
        p = bp._fixed_shape(zoo.ppocr_cls_path(), [1, 3, 48, 192], cache / "ppocr_cls_48x192.onnx")
        return Model(name, p, "cls", _per_sample(bp.rec_lines(n_calib, 0, w=192), "x"),
                     _per_sample(bp.rec_lines(n_eval, 1, w=192), "x"))
    if name == "minilm":
        words = list(bp._WORDS)
        rng = np.random.default_rng(0)

        def sentences(n):
            return [" ".join(rng.choice(words, rng.integers(4, 20))) for _ in range(n)]

        def feeds(n):
            ids, mask = zoo.minilm_tokens(sentences(n))
            return [{"input_ids": ids[i : i + 1], "attention_mask": mask[i : i + 1]} for i in range(n)]

        return Model(name, zoo.minilm_path(), "emb", feeds(n_calib), feeds(n_eval))
    if name == "kws-gru":
        calib, _ = zoo.kws_samples(n_calib, seed=0)
        ev, labels = zoo.kws_samples(n_eval, seed=1)
        return Model(name, zoo.kws_gru_path(), "cls", calib, ev, labels)
    raise SystemExit(f"unknown model {name}; known: {', '.join(MODELS)}")


def write_samples(samples: list[dict[str, np.ndarray]], folder: Path) -> Path:
    """One .npz per sample, arrays in the model's own input shapes (the per-sample calibration format)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(samples):
        np.savez(folder / f"{i:05d}.npz", **s)
    return folder


def ctc_text(logits: np.ndarray) -> list[tuple[int, ...]]:
    out = []
    for seq in logits.argmax(-1):
        keep, prev = [], 0
        for c in seq:
            if c != prev and c != 0:
                keep.append(int(c))
            prev = c
        out.append(tuple(keep))
    return out


def text_equality(m: Model, out_dir: Path) -> float | None:
    """Fraction of held-out lines whose decoded text equals the original's (artifact run here, or its exact
    reference where its runtime cannot run here); None when neither can run."""
    from edgeopt.backends import get
    from edgeopt.backends.base import read_verified
    from edgeopt.fidelity import session
    from edgeopt.pipeline import open_here

    art = read_verified(out_dir)
    runner = open_here(out_dir) or get(art.backend).BACKEND.reference(art, out_dir)
    if runner is None:
        return None
    ref = session(str(m.path))
    with runner:
        a = [ctc_text(ref.run(None, f)[0])[0] for f in m.eval]
        b = [ctc_text(np.asarray(runner.run(f)[0]))[0] for f in m.eval]
    return float(np.mean([x == y for x, y in zip(a, b)]))


def run_cell(m: Model, target: str, data: dict[str, Path], work: Path, timeout: int) -> Cell:
    cell = Cell(m.name, target)
    out = work / f"{m.name}-{target}"
    cmd = [sys.executable, "-m", "edgeopt.cli", "build", str(m.path), "--target", target, "--calib", str(data["calib"]),
           "--eval", str(data["eval"]), "-o", str(out)]
    if "labels" in data:
        cmd += ["--labels", str(data["labels"])]
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        cell.status, cell.detail, cell.seconds = "INTERNAL", f"no answer within {timeout} s", time.perf_counter() - t
        return cell
    cell.seconds = time.perf_counter() - t
    err = proc.stderr.strip().splitlines()
    if proc.returncode == 2 and err and err[-1].startswith("error: "):
        cell.status, cell.detail = "refused", err[-1][len("error: "):]
        return cell
    if proc.returncode != 0:
        cell.status, cell.detail = "INTERNAL", f"exit {proc.returncode}: {(err or ['(no output)'])[-1][:300]}"
        return cell
    from edgeopt.backends.base import read_verified

    art = read_verified(out)
    precs: dict[str, int] = {}
    for lp in art.plan.layers:
        if lp.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose", "GRU", "LSTM"):
            precs[lp.precision] = precs.get(lp.precision, 0) + 1
    cell.status = "built"
    pruned = sum(lp.sparsity != "none" for lp in art.plan.layers)
    cell.detail = (f"{art.backend} {'/'.join(f'{k}:{n}' for k, n in sorted(precs.items()))}"
                   + (f" pruned:{pruned}" if pruned else "") + f" {art.size_bytes / 2**20:.2f} MiB")
    keys = ("accuracy_delta", "top1_agreement", "snr_db", "cosine")
    cell.fidelity = {k: float(v) for k, v in art.accuracy.items() if k in keys}
    if m.kind == "rec":
        eq = text_equality(m, out)
        if eq is not None:
            cell.fidelity["text_equal"] = eq
    return cell


def show(cell: Cell) -> str:
    if cell.status != "built":
        return f"{cell.status}: {cell.detail}"
    f = cell.fidelity
    shown = [f"{k} {f[k]:+.4f}" if k == "accuracy_delta" else (f"{k} {f[k]:.1f}" if k == "snr_db" else f"{k} {f[k]:.4f}")
             for k in ("accuracy_delta", "top1_agreement", "text_equal", "snr_db") if k in f]
    return f"{cell.detail}; {', '.join(shown) or 'fidelity not measured'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--calib", type=int, default=64, help="calibration samples per model")
    ap.add_argument("--eval", type=int, default=64, help="held-out samples per model")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    ap.add_argument("--json", type=Path, help="also write the cells as JSON")
    args = ap.parse_args()
    from edgeopt.hostinfo import detect

    cpu = detect()
    print(f"host: {cpu.arch} {cpu.model_name} [{cpu.kernel_class}]", flush=True)
    cache = Path(tempfile.gettempdir()) / "edgeopt-bench-models"
    cache.mkdir(exist_ok=True)
    cells: list[Cell] = []
    with tempfile.TemporaryDirectory(prefix="bench-models-") as d:
        work = Path(d)
        for name in args.models.split(","):
            try:
                m = load_model(name, cache, args.calib, args.eval)
            except Exception as e:  # a model this machine cannot make (a package missing): its row says so
                for t in args.targets.split(","):
                    cells.append(Cell(name, t, "refused", f"model unavailable here: {type(e).__name__}: {e}"))
                continue
            data = {"calib": write_samples(m.calib, work / f"{name}-calib"),
                    "eval": write_samples(m.eval, work / f"{name}-eval")}
            if m.labels is not None:
                np.save(work / f"{name}-labels.npy", m.labels)
                data["labels"] = work / f"{name}-labels.npy"
            for t in args.targets.split(","):
                cell = run_cell(m, t, data, work, args.timeout)
                cells.append(cell)
                print(f"{name:12} {t:14} {cell.seconds:6.1f} s  {show(cell)}", flush=True)
    print()
    targets = args.targets.split(",")
    print("| model | " + " | ".join(targets) + " |")
    print("|---|" + "---|" * len(targets))
    for name in dict.fromkeys(c.model for c in cells):
        row = {c.target: c for c in cells if c.model == name}
        print(f"| {name} | " + " | ".join(show(row[t]).replace("|", "/") if t in row else "-" for t in targets) + " |")
    internal = [c for c in cells if c.status == "INTERNAL"]
    if args.json:
        args.json.write_text(json.dumps([asdict(c) for c in cells], indent=2))
    built = sum(c.status == "built" for c in cells)
    print(f"\n{built} built, {sum(c.status == 'refused' for c in cells)} refused, {len(internal)} internal errors")
    print("PASS: no tracebacks, every cell built or refused in one line" if not internal else
          f"FAIL: {len(internal)} cell(s) ended in an internal error: " + "; ".join(f"{c.model}/{c.target}" for c in internal))


if __name__ == "__main__":
    main()
