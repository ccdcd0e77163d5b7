"""The project file (edgeopt.yaml / [tool.edgeopt]): edgeopt init, commands that need nothing else in a project
folder, strict validation, explicit arguments winning, --help and shell completion."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgeopt import cli
from edgeopt.project import (
    NO_PROJECT_HINT,
    PROJECT_FILE,
    ProjectFileError,
    find_project,
    load_project,
    output_name,
    resolve,
    valid_keys,
)

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd: Path):
    """The CLI in a child process in ``cwd``, importing this checkout's edgeopt."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-m", "edgeopt.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)


def main_in(folder: Path, monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """The CLI in this process with ``folder`` as the current folder: (exit code, stdout, stderr)."""
    monkeypatch.chdir(folder)
    rc = cli.main([*map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_line_error(rc: int, err: str, *fragments: str) -> str:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def write(folder: Path, text: str, name: str = PROJECT_FILE) -> Path:
    p = folder / name
    p.write_text(text)
    return p


# --------------------------------------------------------------------------- edgeopt init


def test_init_writes_a_commented_file_that_loads_and_refuses_to_overwrite(tmp_path, monkeypatch, capsys):
    rc, out, err = main_in(tmp_path, monkeypatch, capsys, "init")
    assert rc == 0, err
    assert "wrote edgeopt.yaml" in out
    text = (tmp_path / PROJECT_FILE).read_text()
    assert text.count("\n#") > 10  # commented for a newcomer
    for key in valid_keys():  # every key is shown (set or commented out)
        assert f"{key}:" in text, key
    proj = load_project(tmp_path / PROJECT_FILE)
    assert proj.model == "default" and proj.target is None and proj.targets == "all"
    assert proj.output == tmp_path / "build" and proj.build_dir("jetson") == tmp_path / "build" / "jetson"
    assert proj.fleet_dir() == tmp_path / "build" / "fleet"
    assert proj.sha256 == hashlib.sha256((tmp_path / PROJECT_FILE).read_bytes()).hexdigest()

    (tmp_path / PROJECT_FILE).write_text("model: default\n# mine\n")
    rc, _, err = main_in(tmp_path, monkeypatch, capsys, "init")
    one_line_error(rc, err, "already exists", "--force")
    assert (tmp_path / PROJECT_FILE).read_text() == "model: default\n# mine\n"  # untouched
    rc, _, err = main_in(tmp_path, monkeypatch, capsys, "init", "--force", "--target", "x86-cpu")
    assert rc == 0, err
    assert load_project(tmp_path / PROJECT_FILE).target == "x86-cpu"


def test_init_with_a_model_and_targets(tmp_path, monkeypatch, capsys, digits_model):
    (tmp_path / "models").mkdir()
    shutil.copy(digits_model, tmp_path / "models" / "net.onnx")
    rc, _, err = main_in(tmp_path, monkeypatch, capsys, "init", "--model", "models/net.onnx", "--target", "mcu-cortex-m7",
                         "--targets", "x86-cpu,mcu-cortex-m7")
    assert rc == 0, err
    text = (tmp_path / PROJECT_FILE).read_text()
    assert "\nmodel: models/net.onnx\n" in text and "\n# calib: data/calib/\n" in text  # data offered, commented out
    proj = load_project(tmp_path / PROJECT_FILE)
    assert proj.model == str(tmp_path / "models" / "net.onnx") and proj.calib is None
    assert proj.target == "mcu-cortex-m7" and proj.targets == "x86-cpu,mcu-cortex-m7"
    # uncommenting the data keys (once the files exist) gives a project that loads them
    (tmp_path / "data" / "calib").mkdir(parents=True)
    for name in ("eval.npz", "labels.npy", "sample.npz"):
        (tmp_path / "data" / name).write_bytes(b"")
    for key in ("calib", "eval", "labels", "inputs"):
        text = text.replace(f"\n# {key}: ", f"\n{key}: ")
    (tmp_path / PROJECT_FILE).write_text(text)
    proj = load_project(tmp_path / PROJECT_FILE)
    assert proj.calib == tmp_path / "data" / "calib" and proj.labels == tmp_path / "data" / "labels.npy"
    assert proj.eval_data == tmp_path / "data" / "eval.npz" and proj.inputs == tmp_path / "data" / "sample.npz"
    # bad inputs to init: nothing written
    sub = tmp_path / "sub"
    sub.mkdir()
    rc, _, err = main_in(sub, monkeypatch, capsys, "init", "--model", "missing.onnx")
    one_line_error(rc, err, "missing.onnx", "does not exist")
    rc, _, err = main_in(sub, monkeypatch, capsys, "init", "--target", "nano")
    one_line_error(rc, err, "unknown target 'nano'")
    rc, _, err = main_in(sub, monkeypatch, capsys, "--project", "pyproject.toml", "init", "--force")
    one_line_error(rc, err, "[tool.edgeopt]", "by hand")
    assert list(sub.iterdir()) == []


# --------------------------------------------------------------------------- commands in a project folder


def test_build_and_profile_with_no_arguments_in_a_project_folder(tmp_path):
    """The headline: `edgeopt init && edgeopt build --target T && edgeopt profile build/T` (one real build)."""
    assert run("init", "--target", "x86-cpu", cwd=tmp_path).returncode == 0
    p = run("build", cwd=tmp_path)  # the project's target
    assert p.returncode == 0, p.stderr
    out = tmp_path / "build" / "x86-cpu"
    assert "artifact build/x86-cpu: onnxruntime" in p.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == "x86-cpu" and (out / "plan.json").is_file()
    assert manifest["project"] == {"path": str(tmp_path / PROJECT_FILE),
                                   "sha256": hashlib.sha256((tmp_path / PROJECT_FILE).read_bytes()).hexdigest()}
    assert [p.name for p in (tmp_path / "build").iterdir()] == ["x86-cpu"]  # no work folders left
    # profile by the name the build was given, and by the folder
    for args in (["--target", "x86-cpu"], ["build/x86-cpu"], []):
        p = run("profile", *args, "--no-save", "--repeats", "3", "--warmup", "1", "--json", cwd=tmp_path)
        assert p.returncode == 0, (args, p.stderr)
        assert json.loads(p.stdout)["target"] == "x86-cpu"
    p = run("profile", "--target", "jetson-orin", cwd=tmp_path)
    one_line_error(p.returncode, p.stderr, "no artifact at build/jetson-orin", "edgeopt build --target jetson-orin")


def test_commands_without_project_or_model_say_how_to_start(tmp_path, monkeypatch, capsys):
    for args in (["build", "--target", "x86-cpu"], ["build"], ["plan", "--target", "x86-cpu"], ["fleet"],
                 ["fleet", "--targets", "all"], ["analyze"]):
        rc, _, err = main_in(tmp_path, monkeypatch, capsys, *args)
        line = one_line_error(rc, err)
        assert line == f"error: {NO_PROJECT_HINT}", (args, line)
    assert "run 'edgeopt init'" in NO_PROJECT_HINT and "'default'" in NO_PROJECT_HINT
    # a model but no output folder outside a project: say how to give one
    rc, _, err = main_in(tmp_path, monkeypatch, capsys, "build", "default", "--target", "x86-cpu")
    one_line_error(rc, err, "-o/--output", "edgeopt init")
    rc, _, err = main_in(tmp_path, monkeypatch, capsys, "profile")
    one_line_error(rc, err, "no artifact given", "edgeopt init")
    assert list(tmp_path.iterdir()) == []


def test_project_needs_a_target_where_the_command_does(tmp_path, monkeypatch, capsys):
    write(tmp_path, "model: default\n")
    for args in (["build"], ["plan"], ["profile"]):
        rc, _, err = main_in(tmp_path, monkeypatch, capsys, *args)
        one_line_error(rc, err, "--target", str(tmp_path / PROJECT_FILE))
    assert not (tmp_path / "build").exists()


def test_explicit_arguments_override_the_project(tmp_path, monkeypatch, capsys):
    write(tmp_path, "model: default\ntarget: x86-cpu\nobjective: fidelity\nmax_accuracy_drop: 0.05\n")
    rc, out, err = main_in(tmp_path, monkeypatch, capsys, "plan", "--target", "mcu-cortex-m7", "--objective", "latency",
                           "--json")
    assert rc == 0, err
    plan = json.loads(out)
    assert plan["target"] == "mcu-cortex-m7"
    assert plan["objective"] == "latency"  # --objective latency won over the project's fidelity
    assert plan["accuracy"]["budget"]["limit"] == 0.05  # the project's budget still applies
    rc, out, err = main_in(tmp_path, monkeypatch, capsys, "plan", "--json")
    assert rc == 0, err
    plan = json.loads(out)
    assert plan["target"] == "x86-cpu" and plan["objective"] == "fidelity"  # the project's values
    write(tmp_path, "model: default\ntarget: x86-cpu\nmax_accuracy_drop: 0.05\n")
    rc, out, err = main_in(tmp_path, monkeypatch, capsys, "plan", "--json", "--max-accuracy-drop", "0.02")
    assert rc == 0, err
    assert json.loads(out)["accuracy"]["budget"]["limit"] == 0.02


def test_resolve_merges_arguments_over_the_project(tmp_path, digits_model):
    shutil.copy(digits_model, tmp_path / "m.onnx")
    (tmp_path / "calib.npz").write_bytes(b"")
    (tmp_path / "targets").mkdir()
    (tmp_path / "targets" / "m7.yaml").write_text("base: mcu-cortex-m7\nname: m7\n")
    write(tmp_path, "model: m.onnx\ncalib: calib.npz\ninput_shapes: {x: [1, 3, 8, 8]}\nmin_snr_db: 25\n"
                    "target: targets/m7.yaml\ntargets: [x86-cpu, targets/m7.yaml]\noutput: out\n")
    proj = load_project(tmp_path / PROJECT_FILE)
    assert proj.target == str(tmp_path / "targets" / "m7.yaml")  # a target file: relative to the project file
    assert proj.targets == f"x86-cpu,{tmp_path / 'targets' / 'm7.yaml'}"
    s = resolve(proj, output_for="build", need_target=True)
    assert s.model == str(tmp_path / "m.onnx") and s.calib == tmp_path / "calib.npz" and s.input_shapes == ["x=1x3x8x8"]
    assert s.output == tmp_path / "out" / "m7" and s.min_snr_db == 25 and s.objective == "latency"
    assert output_name("targets/m7.yaml") == "m7" and output_name("jetson") == "jetson"
    # an explicit model drops the project's model-bound data, keeps its budget; explicit values win
    s = resolve(proj, model="other.onnx", target="x86-cpu", output_for="build", min_snr_db=40.0, objective="fidelity")
    assert (s.model, s.calib, s.input_shapes) == ("other.onnx", None, None)
    assert s.output == tmp_path / "out" / "x86-cpu" and s.min_snr_db == 40.0 and s.objective == "fidelity"
    s = resolve(proj, calib=Path("c2"), input_shapes=["x=1x3x9x9"], output=Path("o"), output_for="fleet", targets="all")
    assert (s.calib, s.input_shapes, s.output, s.targets) == (Path("c2"), ["x=1x3x9x9"], Path("o"), "all")
    assert resolve(proj, output_for="fleet").output == tmp_path / "out" / "fleet"
    assert resolve(None, model="default").objective == "latency" and resolve(None, model="m").targets == "all"


# --------------------------------------------------------------------------- pyproject.toml


def test_pyproject_tool_edgeopt_is_read_when_there_is_no_edgeopt_yaml(tmp_path, monkeypatch, capsys, digits_model):
    shutil.copy(digits_model, tmp_path / "net.onnx")
    py = write(tmp_path, '[project]\nname = "x"\n\n[tool.edgeopt]\nmodel = "net.onnx"\ntarget = "mcu-cortex-m7"\n'
                         'targets = ["x86-cpu"]\n', "pyproject.toml")
    proj = find_project(tmp_path)
    assert proj is not None and proj.path == py and proj.table == "tool.edgeopt"
    assert proj.model == str(tmp_path / "net.onnx") and proj.target == "mcu-cortex-m7" and proj.targets == "x86-cpu"
    assert proj.record() == {"path": str(py), "sha256": hashlib.sha256(py.read_bytes()).hexdigest(),
                             "table": "tool.edgeopt"}
    rc, out, err = main_in(tmp_path, monkeypatch, capsys, "plan", "--json")
    assert rc == 0, err
    assert json.loads(out)["target"] == "mcu-cortex-m7"
    write(tmp_path, '[tool.edgeopt]\nmodle = "net.onnx"\n', "pyproject.toml")
    rc, _, err = main_in(tmp_path, monkeypatch, capsys, "plan", "--json")
    one_line_error(rc, err, "[tool.edgeopt]", "unknown key 'modle'", "did you mean 'model'")
    write(tmp_path, "model: default\ntarget: x86-cpu\n")  # an edgeopt.yaml wins
    assert find_project(tmp_path).path == tmp_path / PROJECT_FILE
    (tmp_path / PROJECT_FILE).unlink()
    write(tmp_path, '[project]\nname = "x"\n', "pyproject.toml")  # no [tool.edgeopt]: no project
    assert find_project(tmp_path) is None
    write(tmp_path, "[tool.edgeopt\n", "pyproject.toml")
    with pytest.raises(ProjectFileError, match="not valid TOML"):
        find_project(tmp_path)


# --------------------------------------------------------------------------- strict validation


@pytest.mark.parametrize("text, fragments", [
    ("model: default\ncalibration: data/\n", ["unknown key 'calibration'", "did you mean 'calib'", "valid keys: model,"]),
    ("model: missing.onnx\n", ["model: missing.onnx", "does not exist", "relative to the project file"]),
    ("model: default\noutput: [1]\n", ["output:", "valid string"]),
    ("model: default\nmax_accuracy_drop: '0.1'\n", ["max_accuracy_drop", "valid number"]),
    ("model: default\nmax_accuracy_drop: 2\n", ["max_accuracy_drop", "between 0 and 1"]),
    ("model: default\nobjective: speed\n", ["objective", "latency", "fidelity"]),
    ("model: default\ntargets: [x86-cpu, 3]\n", ["targets", "list of target names"]),
    ("model: default\ncalib: data/\n", ["'default'", "brings its own data", "calib"]),
    ("model: [unclosed\n", ["not valid YAML", "line 2"]),
    ("- model\n", ["must hold a mapping", "not a list"]),
    ("model: default\n1: x\n", ["key 1 is not a string"]),
    ("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n", ["10,000 values"]),
])
def test_bad_project_files_are_refused_in_one_line(tmp_path, monkeypatch, capsys, text, fragments):
    write(tmp_path, text)
    rc, _, err = main_in(tmp_path, monkeypatch, capsys, "build", "--target", "x86-cpu")
    one_line_error(rc, err, str(tmp_path / PROJECT_FILE), *fragments)
    assert list(tmp_path.iterdir()) == [tmp_path / PROJECT_FILE]  # nothing written


def test_unreadable_project_files_are_refused_in_one_line(tmp_path, monkeypatch, capsys):
    p = tmp_path / PROJECT_FILE
    p.write_bytes(b"model: d\xe9fault\n")
    one_line_error(*main_in(tmp_path, monkeypatch, capsys, "plan")[::2], "not UTF-8", "0xe9")
    p.write_bytes(b"#" * ((1 << 20) + 1))
    one_line_error(*main_in(tmp_path, monkeypatch, capsys, "plan")[::2], "larger than 1 MiB")
    p.unlink()
    p.mkdir()
    one_line_error(*main_in(tmp_path, monkeypatch, capsys, "plan")[::2], "not a regular file")
    p.rmdir()
    os.mkfifo(p)  # must not block the read
    one_line_error(*main_in(tmp_path, monkeypatch, capsys, "plan")[::2], "not a regular file")
    p.unlink()
    p.symlink_to(tmp_path / "nowhere.yaml")
    one_line_error(*main_in(tmp_path, monkeypatch, capsys, "plan")[::2], "cannot read project file")
    p.unlink()
    write(tmp_path, "")  # empty: every default (the embedded model), still needs a target
    one_line_error(*main_in(tmp_path, monkeypatch, capsys, "plan")[::2], "no target given")
    one_line_error(*main_in(tmp_path, monkeypatch, capsys, "--project", tmp_path / "other.yaml", "plan")[::2],
                   "other.yaml does not exist")


# --------------------------------------------------------------------------- --help and completion


def test_help_lists_every_command_with_a_one_line_description(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    ap = cli._parser()
    helps = {a.dest: a.help for act in ap._actions if hasattr(act, "_choices_actions") for a in act._choices_actions}
    assert {"init", "build", "fleet", "plan", "analyze", "profile", "completion", "targets"} <= set(helps)
    assert set(helps) == set(cli._subparsers(ap))  # every command has a description
    lines = out.splitlines()
    for name, text in helps.items():  # on one 80-column line: the name, then the whole description
        assert any(ln.split() == [name, *text.split()] for ln in lines), (name, out)
    assert "edgeopt build --target jetson" in out  # the project workflow, in the epilog


def test_completion_scripts_parse_and_complete_commands_and_options(tmp_path):
    bash = shutil.which("bash")
    if bash is None:
        pytest.fail("bash is not installed")
    for shell in ("bash", "zsh"):
        p = run("completion", shell, cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        script = tmp_path / f"edgeopt.{shell}"
        script.write_text(p.stdout)
        if shell == "bash":
            check = subprocess.run([bash, "-n", str(script)], capture_output=True, text=True)
            assert check.returncode == 0, check.stderr
    assert p.stdout.startswith("#compdef edgeopt\n") and "bashcompinit" in p.stdout

    def complete(*words: str) -> list[str]:
        code = (f'source {tmp_path / "edgeopt.bash"}; COMP_WORDS=(edgeopt {" ".join(map(repr, words))}); '
                f'COMP_CWORD={len(words)}; _edgeopt; printf "%s\\n" "${{COMPREPLY[@]}}"')
        r = subprocess.run([bash, "-c", code], capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        return r.stdout.split()

    assert set(complete("")) >= {"init", "build", "fleet", "plan", "analyze", "profile", "completion", "targets"}
    assert complete("bu") == ["build"]
    assert complete("--project", "x.yaml", "build", "--ta") == ["--target"]
    assert "jetson-orin" in complete("build", "--target", "jet")
    assert complete("plan", "--objective", "f") == ["fidelity"]
    assert {"list", "show", "detect"} <= set(complete("targets", ""))


def test_zsh_completion_registers_through_bashcompinit(tmp_path):
    zsh = shutil.which("zsh")
    if zsh is None:
        pytest.skip("zsh is not installed (apt-get install zsh); the bash script is checked without it")
    script = tmp_path / "edgeopt.zsh"
    script.write_text(run("completion", "zsh", cwd=tmp_path).stdout)
    assert subprocess.run([zsh, "-n", str(script)], capture_output=True).returncode == 0
    # bashcompinit runs the function with sh emulation (0-based arrays); zsh filters the words by the prefix itself
    code = (f"autoload -U +X compinit && compinit -u -d {tmp_path}/zcompdump; source {script}; "
            "print -r -- ${_comps[edgeopt]}; "
            "f() { emulate -L sh; COMP_WORDS=(edgeopt build --target jet); COMP_CWORD=3; _edgeopt; echo ${COMPREPLY[@]}; }; f")
    r = subprocess.run([zsh, "-f", "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    registered, targets = r.stdout.splitlines()
    assert registered == "_bash_complete -o filenames -F _edgeopt"
    assert "jetson-orin" in targets.split() and "build" not in targets.split()


def test_readme_quick_start_project_file_loads_and_matches_init(tmp_path):
    import re

    readme = (ROOT / "README.md").read_text()
    quick = readme.split("### Quick start", 1)[1].split("\n### ", 1)[0]
    shown = re.findall(r"without them it is:\n\n```\n(.*?)\n```", quick, re.S)
    assert len(shown) == 1, "the quick start shows the project file once"
    write(tmp_path, shown[0] + "\n")
    proj = load_project(tmp_path / PROJECT_FILE)
    assert (proj.model, proj.objective, proj.targets, proj.output) == ("default", "latency", "all", tmp_path / "build")
    assert "edgeopt init" in quick and "edgeopt build --target" in quick and "edgeopt fleet --targets all" in quick
    # the keys it shows, set or commented out, are the keys edgeopt init writes
    assert {k for k in valid_keys() if re.search(rf"^#? ?{k}:", shown[0], re.M)} == set(valid_keys()) - {"eval", "labels",
                                                                                                         "inputs"}


def test_the_headline_command_in_an_empty_folder(tmp_path):
    """Issue 13's acceptance: `edgeopt init` then `edgeopt build --target jetson` (the family name) builds the embedded
    default into build/jetson/ with a manifest naming the family's default device."""
    import json

    assert run("init", cwd=tmp_path).returncode == 0
    p = run("build", "--target", "jetson", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    manifest = json.loads((tmp_path / "build" / "jetson" / "manifest.json").read_text())
    assert manifest["target"] == "jetson-orin" and manifest["backend"] == "tensorrt"
    assert manifest["project"]["path"].endswith("edgeopt.yaml")


def test_latency_limit_and_preprocess_keys(tmp_path, monkeypatch, capsys):
    write(tmp_path, "model: default\nmax_latency_ms: 0.000001\n")
    proj = load_project(tmp_path / PROJECT_FILE)
    assert proj.max_latency_ms == 1e-6
    assert resolve(proj).max_latency_ms == 1e-6 and resolve(proj, max_latency_ms=5.0).max_latency_ms == 5.0
    rc, _, err = main_in(tmp_path, monkeypatch, capsys, "plan", "--target", "x86-cpu")
    one_line_error(rc, err, "no plan meets the budgets of x86-cpu")
    write(tmp_path, "model: default\nmax_latency_ms: 0\n")
    with pytest.raises(ProjectFileError, match="max_latency_ms: must be a positive number"):
        load_project(tmp_path / PROJECT_FILE)
    (tmp_path / "imgs").mkdir()
    shutil.copy(ROOT / "edgeopt" / "data" / "digits_cnn.onnx", tmp_path / "m.onnx")
    write(tmp_path, "model: m.onnx\ncalib: imgs\npreprocess: imagenet\n")
    assert resolve(load_project(tmp_path / PROJECT_FILE)).preprocess == "imagenet"
    write(tmp_path, "model: default\npreprocess: bicubic\n")
    with pytest.raises(ProjectFileError, match="preprocess"):
        load_project(tmp_path / PROJECT_FILE)
