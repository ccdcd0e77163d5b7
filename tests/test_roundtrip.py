"""Every artifact edgeopt writes can be read back by every edgeopt command that reads artifacts: each backend and
each precision its targets list (lossless included) is built with ``edgeopt build``, then its manifest is parsed
strictly, it is profiled with ``edgeopt profile --device local`` (or refused in one line where its runtime cannot run
here) and its plan is replayed with ``edgeopt build --plan`` (issue 11)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeopt.cli import main
from edgeopt.targets import load_target

#: one target per backend and unit kind; every precision its options list is built
TARGETS = ("x86-cpu", "android-mid", "gpu-server", "ios", "mcu-cortex-m7")


def _cases() -> list[tuple[str, str, str]]:
    seen, out = set(), []
    for name in TARGETS:
        for option in load_target(name).backends:
            for precision in option.precisions:
                key = (name, option.backend, precision)
                if key not in seen:
                    seen.add(key)
                    out.append(key)
    return out


def _no_bare_constants(text: str) -> None:
    def refuse(token: str):
        raise AssertionError(f"manifest holds {token}, which strict JSON readers refuse")

    json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize(("target", "backend", "precision"), _cases())
def test_every_artifact_reads_back(tmp_path, capsys, target, backend, precision):
    from edgeopt.backends.base import read_verified
    from edgeopt.types import Artifact

    out = tmp_path / "out"
    rc = main(["build", "default", "--target", target, "--backend", backend, "--precision", precision, "-o", str(out)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    text = (out / "manifest.json").read_text()
    _no_bare_constants(text)
    art = Artifact.model_validate_json(text)
    assert read_verified(out) == art and art.backend == backend
    if art.measured_latency_ms is not None and not art.measured_on_target:  # a host figure is labelled as such
        assert f"which is not a {target}: not the device's latency" in cap.out, cap.out

    rc = main(["profile", str(out), "--device", "local", "--no-save", "--warmup", "0", "--repeats", "2"])
    cap = capsys.readouterr()
    if rc == 0:
        assert "ms" in cap.out
    else:  # the runtime cannot run here: one line saying why, never a traceback or an unreadable manifest
        assert rc == 2, cap.err
        lines = cap.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "manifest" not in lines[0], cap.err

    replay = tmp_path / "replay"
    rc = main(["build", "default", "--target", target, "--plan", str(out / "plan.json"), "-o", str(replay)])
    assert rc == 0, capsys.readouterr().err
    again = read_verified(replay)
    assert again.plan.layers == art.plan.layers and again.backend == backend
    assert (Path(replay) / "plan.json").is_file()
