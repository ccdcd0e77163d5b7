"""Builds clean up after themselves: killed builds leave nothing that lasts, concurrent builds into one ``-o`` each
land whole, temp files live in the build's own work folder (issue 11)."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from edgeopt.io import atomic_dir, recover


def _beside(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}."))


def test_atomic_dir_replaces_whole_and_leaves_nothing(tmp_path):
    dest = tmp_path / "out"
    with atomic_dir(dest) as d:
        (d / "a").write_text("1")
        assert tempfile.gettempdir().startswith(str(tmp_path / ".out.edgeopt-"))  # temp files in the work folder
    assert tempfile.gettempdir() != str(d)
    with atomic_dir(dest) as d:
        (d / "b").write_text("2")
    assert sorted(p.name for p in dest.iterdir()) == ["b"] and _beside(dest) == []
    with pytest.raises(RuntimeError), atomic_dir(dest) as d:
        (d / "c").write_text("3")
        raise RuntimeError("boom")
    assert sorted(p.name for p in dest.iterdir()) == ["b"] and _beside(dest) == []


def test_recover_removes_dead_work_folders_keeps_live_ones(tmp_path):
    dest = tmp_path / "out"
    dead = tmp_path / ".out.edgeopt-dead1234"
    (dead / "out").mkdir(parents=True)
    (dead / "lock").write_text("1\n")
    live = tmp_path / ".out.edgeopt-live1234"
    (live / "out").mkdir(parents=True)
    (live / "lock").write_text("2\n")
    fd = os.open(live / "lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a build running in another process holds its lock
    young = tmp_path / ".out.edgeopt-young123"  # created, not yet locked: left alone for a grace period
    young.mkdir()
    try:
        done = recover(dest)
        assert not dead.exists() and live.exists() and young.exists()
        assert any("dead1234" in d for d in done)
    finally:
        os.close(fd)
    assert recover(dest) and not live.exists()


def test_recover_restores_or_removes_old(tmp_path):
    dest = tmp_path / "out"
    old = tmp_path / ".out.old"
    old.mkdir()
    (old / "manifest.json").write_text("{}")
    recover(dest)  # crashed between the renames: the previous result comes back
    assert (dest / "manifest.json").is_file() and not old.exists()
    # a stale .old file, or a symlink to something precious, is removed without following it
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep").write_text("x")
    for make in (lambda: old.write_text("junk"), lambda: old.symlink_to(precious)):
        make()
        with atomic_dir(dest) as d:
            (d / "new").write_text("1")
        assert (dest / "new").is_file() and not os.path.lexists(old)
    assert (precious / "keep").read_text() == "x"


_WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from edgeopt.io import atomic_dir
    dest, tag, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    for i in range(rounds):
        with atomic_dir(dest) as d:
            (d / "a.txt").write_text(f"{tag}-{i}")
            (d / "b.txt").write_text(f"{tag}-{i}")
""")


def test_concurrent_writers_into_one_dest_each_land_whole(tmp_path):
    dest = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(dest), f"p{k}", "120"], stderr=subprocess.PIPE,
                              text=True) for k in range(3)]
    errors = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert all(rc == 0 for rc, _ in errors), errors
    assert (dest / "a.txt").read_text() == (dest / "b.txt").read_text()
    assert _beside(dest) == []


def _temp_leftovers(folder: Path) -> list[str]:
    """Temporary folders/files (a runtime's small session marker file, e.g. ``.ses``, is not a leftover)."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() or p.name.startswith(("tmp", "edgeopt")))


def _build_cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "edgeopt.cli", "build", "default", "--target", "x86-avx2", "-o", str(out)]


def test_killed_builds_leave_nothing_the_next_build_keeps(tmp_path):
    """SIGKILL a real build at several points: the previous artifact stays intact, nothing lands in the system temp
    folder, and the next build removes what the killed ones left beside the output."""
    from edgeopt.backends.base import read_verified

    systmp = tmp_path / "systmp"
    systmp.mkdir()
    env = {**os.environ, "TMPDIR": str(systmp), "EDGEOPT_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "out"
    first = subprocess.run(_build_cmd(out), env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    read_verified(out)
    for delay in (0.3, 0.8, 1.5, 2.5):
        proc = subprocess.Popen(_build_cmd(out), env={**env, "EDGEOPT_CACHE": str(tmp_path / f"cache{delay}")},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        read_verified(out)  # the previous artifact (or a complete new one), never a damaged one
    # only the killed runs' own scratch folders, which the next run removes
    assert all(n.startswith("edgeopt-run-") for n in _temp_leftovers(systmp)), _temp_leftovers(systmp)
    again = subprocess.run(_build_cmd(out), env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    read_verified(out)
    assert _beside(out) == [] and _temp_leftovers(systmp) == []


def test_build_temp_files_live_in_its_work_folder(tmp_path, monkeypatch):
    """The int8 pass and onnxruntime's quantizer write temporary models: under the build's work folder."""
    from edgeopt.pipeline import BuildInputs, build
    from edgeopt.targets import load_target

    seen = []
    real = tempfile.mkdtemp

    def spy(*a, **kw):
        path = real(*a, **kw)
        seen.append(path)
        return path

    monkeypatch.setattr(tempfile, "mkdtemp", spy)
    build(BuildInputs.default_model(), load_target("x86-cpu"), tmp_path / "out", precision="int8")
    work = [p for p in seen if "edgeopt-int8-" in p or "edgeopt-calib-" in p]
    assert work, seen
    assert all(Path(p).is_relative_to(tmp_path) and "/.out.edgeopt-" in p for p in work), work
    assert _beside(tmp_path / "out") == []


def test_run_scratch_holds_temp_files_and_sweeps_dead_runs(tmp_path, monkeypatch):
    from edgeopt.io import locked_workdir, run_scratch

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = tmp_path / "edgeopt-run-deadbeef"
    dead.mkdir()
    (dead / "lock").write_text("1\n")
    live, fd = locked_workdir("edgeopt-run-", tmp_path)
    try:
        with run_scratch() as scratch:
            assert tempfile.gettempdir() == str(scratch) and scratch.is_relative_to(tmp_path)
            with tempfile.TemporaryDirectory() as d:
                assert Path(d).is_relative_to(scratch)
            assert not dead.exists() and live.exists()
        assert not scratch.exists() and tempfile.gettempdir() == str(tmp_path)
    finally:
        os.close(fd)


def test_killed_fleet_leaves_nothing_after_the_next_run(tmp_path):
    """A fleet killed mid-way leaves its work folder (the partial fleet) beside -o; the next fleet removes it."""
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    env = {**os.environ, "TMPDIR": str(systmp), "EDGEOPT_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "fleet"
    cmd = [sys.executable, "-m", "edgeopt.cli", "fleet", "default", "--targets", "x86-avx2,mcu-cortex-m7", "-o", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not _beside(out):  # wait until it has started writing
        time.sleep(0.1)
    assert _beside(out), "the fleet never started writing"
    proc.send_signal(signal.SIGKILL)  # mid-way: its work folder exists
    proc.wait()
    assert _beside(out) and not out.exists()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert (out / "report.html").is_file() and _beside(out) == [] and _temp_leftovers(systmp) == []
