"""Remote profiling: a fake adb, a loopback SSH server (asyncssh) and the edgeopt agent on loopback."""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgeopt.agent import make_server
from edgeopt.backends.base import make_artifact, read_manifest, write_manifest
from edgeopt.datasets import default_model_path
from edgeopt.errors import EdgeoptError
from edgeopt.graph import analyze
from edgeopt.planner import make_plan
from edgeopt.remote import (
    AdbDevice,
    AgentDevice,
    LocalDevice,
    SshDevice,
    pack_artifact,
    parse_benchmark_model,
    parse_device,
)
from edgeopt.targets import load_target
from edgeopt.types import Profile

FAST = {"threads": 1, "warmup": 2, "repeats": 20}
TOKEN = "s3cret-token-for-tests"

BENCHMARK_OUTPUT = """\
INFO: STARTING!
INFO: Log parameter values verbosely: [0]
INFO: Num threads: [4]
INFO: Graph: [{graph}]
INFO: Loaded model {graph}
INFO: Created TensorFlow Lite XNNPACK delegate for CPU.
INFO: The input model file size (MB): 0.0412
INFO: Initialized session in 3.164ms.
INFO: Running benchmark for at least 2 iterations and at least 0 seconds but terminate if exceeding 150 seconds.
INFO: count=2 first=512 curr=301 min=301 max=512 avg=406.5 std=105 p5=301 median=512 p95=512

INFO: Running benchmark for at least 20 iterations and at least 0 seconds but terminate if exceeding 150 seconds.
INFO: count=20 first=212 curr=198 min=181 max=260 avg=203.4 std=17 p5=183 median=199 p95=251

INFO: Inference timings in us: Init: 3164, First inference: 512, Warmup (avg): 406.5, Inference (avg): 203.4
INFO: Note: as the benchmark tool itself affects memory footprint, the following is only APPROXIMATE to the actual memory footprint of the model at runtime. Take the information at your discretion.
INFO: Memory footprint delta from the start of the tool (MB): init=2.125 overall=3.5
INFO: Overall peak memory footprint (MB) via periodic monitoring: 6.25
Operator-wise Profiling Info for Regular Benchmark Runs:
============================== Run Order ==============================
\t             [node type]\t          [start]\t  [first]\t [avg ms]\t     [%]\t  [cdf%]\t  [mem KB]\t[times called]\t[Name]
\t     TfLiteXNNPackDelegate\t            0.000\t    0.150\t    0.120\t 75.000%\t 75.000%\t     0.000\t        1\t[/9/Relu_output_0]:0
\t         FULLY_CONNECTED\t            0.121\t    0.045\t    0.040\t 25.000%\t100.000%\t     0.000\t        1\t[logits]:1

============================== Top by Computation Time ==============================
\t             [node type]\t          [start]\t  [first]\t [avg ms]\t     [%]\t  [cdf%]\t  [mem KB]\t[times called]\t[Name]
\t     TfLiteXNNPackDelegate\t            0.000\t    0.150\t    0.120\t 75.000%\t 75.000%\t     0.000\t        1\t[/9/Relu_output_0]:0

Timings (microseconds): count=20 first=200 curr=160 min=150 max=230 avg=160 std=12
"""


@pytest.fixture(scope="module")
def tflite_artifact(tmp_path_factory):
    """A tflite artifact as `edgeopt build` lays it out (the model bytes are a stand-in: only the device reads them)."""
    plan = make_plan(analyze(default_model_path()), load_target("android-mid"), backend="tflite", precision="fp32")
    out = tmp_path_factory.mktemp("remote") / "digits-tflite"
    out.mkdir()
    (out / "model.tflite").write_bytes(b"\x1c\x00\x00\x00TFL3" + bytes(64))
    (out / "tflite.json").write_text(json.dumps({"threads": 4, "delegate": "xnnpack", "inputs": [], "outputs": []}))
    write_manifest(make_artifact(out, "model.tflite", plan, "tflite", {"python": "3"}), out)
    return out


def cli(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "edgeopt.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


# --------------------------------------------------------------------------- device strings


def test_parse_device_forms(monkeypatch):
    monkeypatch.delenv("EDGEOPT_AGENT_TOKEN", raising=False)
    assert isinstance(parse_device("local"), LocalDevice)
    d = parse_device("ssh://pi@rpi.lan:2222")
    assert isinstance(d, SshDevice) and (d.user, d.host, d.port) == ("pi", "rpi.lan", 2222)
    assert d.spec == "ssh://pi@rpi.lan:2222" and d.slug == "ssh-pi-rpi.lan-2222"
    assert parse_device("ssh://box").spec == "ssh://box"
    assert parse_device("adb:emulator-5554").spec == "adb:emulator-5554"
    assert parse_device("adb:192.168.1.7:5555").serial == "192.168.1.7:5555"
    assert parse_device("http://10.0.0.2:9000", token="t").spec == "http://10.0.0.2:9000"
    monkeypatch.setenv("EDGEOPT_AGENT_TOKEN", "from-env")
    assert parse_device("http://dev").token == "from-env" and parse_device("http://dev").url == "http://dev:8765"
    monkeypatch.delenv("EDGEOPT_AGENT_TOKEN")
    with pytest.raises(EdgeoptError, match="--token"):
        parse_device("http://dev:1")
    for bad in ("gpu0", "ssh://", "ssh://-oProxyCommand=x", "ssh://h:notaport", "ssh://u:pw@h", "adb:", "adb:-s x",
                "ftp://h", "http://h/x"):
        with pytest.raises(EdgeoptError, match=r"valid forms: local, ssh://\[user@\]host\[:port\], adb:SERIAL"):
            parse_device(bad)


def test_parse_benchmark_model_output():
    r = parse_benchmark_model(BENCHMARK_OUTPUT.format(graph="/g.tflite"))
    assert r.runs == 20
    assert r.latency_ms == pytest.approx({"p50": 0.199, "mean": 0.2034, "min": 0.181, "max": 0.26, "p5": 0.183,
                                          "p95": 0.251, "std": 0.017})
    assert r.peak_memory_bytes == int(6.25 * 2**20)
    assert [(o.name, o.op_type) for o in r.ops] == [("/9/Relu_output_0", "TfLiteXNNPackDelegate"), ("logits", "FULLY_CONNECTED")]
    assert r.ops[0].mean_us == pytest.approx(120) and r.ops[0].share == pytest.approx(0.75)
    old = ("count=50 first=249042 curr=250889 min=247067 max=254474 avg=249684 std=1442\n"
           "Inference timings in us: Init: 16242, First inference: 360262, Warmup (avg): 304586, Inference (avg): 249684\n"
           "Peak memory footprint (MB): init=4.92969 overall=138.809\n")
    r = parse_benchmark_model(old)
    assert "p50" not in r.latency_ms and r.latency_ms["mean"] == pytest.approx(249.684) and r.ops == []
    assert r.peak_memory_bytes == int(138.809 * 2**20)
    with pytest.raises(EdgeoptError, match="Inference timings"):
        parse_benchmark_model("ERROR: Failed to load model\n")


# --------------------------------------------------------------------------- adb (a fake adb on PATH)

FAKE_ADB = """#!{python}
import json, os, shutil, subprocess, sys
root, args = os.environ["FAKE_ADB_ROOT"], sys.argv[1:]
with open(os.environ["FAKE_ADB_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
if args[:1] != ["-s"] or len(args) < 3 or args[1] != "EMU123":
    print("adb: device not found", file=sys.stderr); sys.exit(1)
cmd, rest = args[2], args[3:]
dev = lambda p: p.replace("/data/local/tmp", root + "/data/local/tmp")
if cmd == "push":
    src, dst = rest
    os.makedirs(os.path.dirname(dev(dst)), exist_ok=True)
    shutil.copyfile(src, dev(dst))
    print(f"{{src}}: 1 file pushed, 0 skipped. 3.1 MB/s ({{os.path.getsize(src)}} bytes in 0.001s)")
elif cmd == "shell" and rest == ["getprop"]:
    print("[ro.build.version.release]: [14]\\n[ro.product.cpu.abi]: [arm64-v8a]\\n"
          "[ro.product.manufacturer]: [Google]\\n[ro.product.model]: [Pixel 7]\\n[ro.soc.model]: [GS201]")
elif cmd == "shell":
    sys.exit(subprocess.run(["sh", "-c", dev(" ".join(rest))]).returncode)
else:
    print("adb: unknown command", file=sys.stderr); sys.exit(1)
"""

FAKE_BENCHMARK = """#!{python}
import os, sys
with open(os.environ["FAKE_BENCH_LOG"], "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
graph = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--graph="))
if not os.path.isfile(graph):
    print("ERROR: Could not open '%s'." % graph); sys.exit(1)
sys.stdout.write(open(os.environ["FAKE_BENCH_OUTPUT"]).read().format(graph=graph))
"""


@pytest.fixture
def fake_adb(tmp_path, monkeypatch):
    root, bin_dir = tmp_path / "device", tmp_path / "bin"
    (root / "data/local/tmp").mkdir(parents=True)
    bin_dir.mkdir()
    adb = bin_dir / "adb"
    adb.write_text(FAKE_ADB.format(python=sys.executable))
    adb.chmod(0o755)
    (tmp_path / "bench.txt").write_text(BENCHMARK_OUTPUT)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("ADB", raising=False)
    for k, v in {"FAKE_ADB_ROOT": root, "FAKE_ADB_LOG": tmp_path / "adb.log", "FAKE_BENCH_LOG": tmp_path / "bench.log",
                 "FAKE_BENCH_OUTPUT": tmp_path / "bench.txt"}.items():
        monkeypatch.setenv(k, str(v))

    def install_benchmark():
        b = root / "data/local/tmp/benchmark_model"
        b.write_text(FAKE_BENCHMARK.format(python=sys.executable))
        b.chmod(0o755)

    def calls():
        return [json.loads(ln) for ln in (tmp_path / "adb.log").read_text().splitlines()]

    return SimpleNamespace(root=root, install_benchmark=install_benchmark, calls=calls,
                           bench_log=tmp_path / "bench.log")


def test_adb_tflite_runs_benchmark_model(fake_adb, tflite_artifact):
    fake_adb.install_benchmark()
    p = parse_device("adb:EMU123").profile(tflite_artifact, warmup=3, repeats=20)
    assert (p.device, p.backend, p.target, p.threads, p.repeats) == ("adb:EMU123", "tflite", "android-mid", 4, 20)
    assert p.latency_ms["p50"] == pytest.approx(0.199) and p.peak_memory_bytes == int(6.25 * 2**20)
    assert p.host["model"] == "Google Pixel 7" and p.host["machine"] == "arm64-v8a" and p.host["unit"] == "cpu"
    assert p.ops[0].op_type == "TfLiteXNNPackDelegate" and p.predicted_latency_ms > 0
    remote = f"/data/local/tmp/edgeopt/{p.artifact_sha256[:12]}"
    calls = fake_adb.calls()
    pushed = sorted(c[4] for c in calls if c[2] == "push")
    assert pushed == sorted(f"{remote}/{f}" for f in ("manifest.json", "model.tflite", "tflite.json"))
    bench_args = fake_adb.bench_log.read_text().split()
    for a in (f"--graph={fake_adb.root}{remote}/model.tflite", "--num_threads=4", "--num_runs=20", "--warmup_runs=3",
              "--use_xnnpack=true", "--enable_op_profiling=true"):
        assert a in bench_args, bench_args
    assert calls[-1][2:] == ["shell", f"rm -rf {remote}"]  # cleaned up
    assert not (fake_adb.root / remote.lstrip("/")).exists()


def test_adb_without_benchmark_model_falls_back_to_python(fake_adb, tflite_artifact, ort_artifact, monkeypatch):
    monkeypatch.setenv("EDGEOPT_ADB_PYTHON", "false")
    with pytest.raises(EdgeoptError, match="no benchmark_model at /data/local/tmp/benchmark_model"):
        AdbDevice("EMU123").profile(tflite_artifact, **FAST)
    monkeypatch.setenv("EDGEOPT_ADB_PYTHON", sys.executable)
    p = AdbDevice("EMU123").profile(ort_artifact, **FAST)  # edgeopt itself runs "on the device"
    assert p.device == "adb:EMU123" and p.backend == "onnxruntime" and p.threads == 1 and p.latency_ms["p99"] > 0
    with pytest.raises(EdgeoptError, match="device not found"):
        AdbDevice("OTHER").profile(ort_artifact, **FAST)


def test_adb_missing_is_a_clear_error(tmp_path, monkeypatch, ort_artifact):
    monkeypatch.delenv("ADB", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EdgeoptError, match=r"adb not found.*\$ADB"):
        AdbDevice("x").profile(ort_artifact, **FAST)


# --------------------------------------------------------------------------- ssh (asyncssh server on loopback)


@pytest.fixture
def ssh_server(tmp_path):
    asyncssh = pytest.importorskip("asyncssh", reason="the loopback SSH server needs asyncssh (pip install asyncssh)")
    if not (shutil.which("ssh") and shutil.which("scp")):
        pytest.skip("the OpenSSH client (ssh, scp) is not installed")
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key, stranger = asyncssh.generate_private_key("ssh-ed25519"), asyncssh.generate_private_key("ssh-ed25519")
    for key, name in ((client_key, "id_ok"), (stranger, "id_stranger")):
        key.write_private_key(str(tmp_path / name))
        (tmp_path / name).chmod(0o600)
    commands: list[str] = []

    async def handle(process):  # run each exec request as a local shell command
        commands.append(process.command)
        proc = await asyncio.create_subprocess_shell(process.command or "true", stdin=subprocess.DEVNULL,
                                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await proc.communicate()
        process.stdout.write(out)
        process.stderr.write(err)
        process.exit(proc.returncode)

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    class SFTPServer(asyncssh.SFTPServer):
        def exit(self):  # report success like OpenSSH's sftp-server does (asyncssh sends no exit status)
            self.channel.exit(0)

    async def start():
        return await asyncssh.create_server(
            asyncssh.SSHServer, "127.0.0.1", 0, server_host_keys=[host_key],
            authorized_client_keys=asyncssh.import_authorized_keys(client_key.export_public_key().decode()),
            process_factory=handle, sftp_factory=SFTPServer, allow_scp=True, encoding=None)

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    port = server.sockets[0].getsockname()[1]
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {host_key.export_public_key().decode().strip()}\n")

    def options(key="id_ok"):
        return (f"-F /dev/null -i {tmp_path / key} -o IdentitiesOnly=yes -o UserKnownHostsFile={known} "
                f"-o StrictHostKeyChecking=yes -o ConnectTimeout=20")

    yield SimpleNamespace(port=port, options=options, commands=commands)

    async def stop():  # on the server's own loop: asyncio servers are not thread-safe (closing one from this thread
        server.close()  # raced the loop and failed in asyncio's _wakeup once in CI)
        await server.wait_closed()

    asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_ssh_profile_through_loopback_server(ssh_server, ort_artifact, tmp_path, monkeypatch):
    spec = f"ssh://tester@127.0.0.1:{ssh_server.port}"
    env = {**os.environ, "EDGEOPT_SSH_OPTIONS": ssh_server.options(), "EDGEOPT_REMOTE_PYTHON": sys.executable}
    p = cli("profile", ort_artifact, "--device", spec, "--threads", 1, "--warmup", 2, "--repeats", 20,
            "--profiles-dir", tmp_path / "pr", env=env)
    assert p.returncode == 0, p.stderr
    assert spec in p.stdout and "p50" in p.stdout and "saved " in p.stdout
    saved = list((tmp_path / "pr" / "x86-cpu").glob(f"onnxruntime-*-ssh-tester-127.0.0.1-{ssh_server.port}-*.json"))
    assert len(saved) == 1
    prof = Profile.model_validate_json(saved[0].read_text())
    assert prof.device == spec and prof.threads == 1 and prof.latency_ms["p50"] > 0 and prof.ops
    profile_cmd = next(c for c in ssh_server.commands if "edgeopt.cli profile" in c)
    tmp = profile_cmd.split()[1]
    assert "--device local --json --no-save" in profile_cmd and not Path(tmp).exists()  # the temp dir was removed

    monkeypatch.setenv("EDGEOPT_SSH_OPTIONS", ssh_server.options("id_stranger"))
    with pytest.raises(EdgeoptError, match="ssh://tester@127.0.0.1.*failed"):
        SshDevice("127.0.0.1", user="tester", port=ssh_server.port).profile(ort_artifact, **FAST)


# --------------------------------------------------------------------------- the agent (http on loopback)


@pytest.fixture
def agent():
    server = make_server("127.0.0.1", 0, TOKEN, max_upload_bytes=2 * 2**20, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(10)


def post(url, body, token=TOKEN, query=""):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(f"{url}/profile{query}", data=body, method="POST", headers=headers)
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def tar_of(members: list[tarfile.TarInfo], data: bytes = b"x") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for m in members:
            if m.isfile():
                m.size = len(data)
                t.addfile(m, io.BytesIO(data))
            else:
                t.addfile(m)
    return buf.getvalue()


def test_agent_profiles_with_token_and_refuses_the_rest(agent, ort_artifact, tmp_path):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{agent.url}/health", timeout=10) as r:
        assert json.loads(r.read())["status"] == "ok"
    p = AgentDevice(agent.url, TOKEN).profile(ort_artifact, **FAST)
    assert p.device == agent.url and p.threads == 1 and p.repeats == 20 and p.latency_ms["p50"] > 0 and p.ops

    with pytest.raises(EdgeoptError, match="rejected the token"):
        AgentDevice(agent.url, "wrong-token").profile(ort_artifact, **FAST)
    assert post(agent.url, b"x", token=None)[0] == 401

    outside = tmp_path / "evil.txt"
    for name in ("../evil.txt", f"..{outside}", "/tmp/evil-abs.txt", "a/../../evil.txt"):
        status, body = post(agent.url, tar_of([tarfile.TarInfo(name)]))
        assert status == 400 and "unsafe path" in body["error"], (name, body)
    link = tarfile.TarInfo("manifest.json")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    status, body = post(agent.url, tar_of([link]))
    assert status == 400 and "not a regular file" in body["error"]
    assert not outside.exists() and not Path("/tmp/evil-abs.txt").exists()

    assert post(agent.url, b"not a tarball")[0] == 400
    assert post(agent.url, tar_of([tarfile.TarInfo("hello.txt")]))[0] == 400  # no manifest
    conn = http.client.HTTPConnection("127.0.0.1", agent.server_address[1], timeout=30)
    conn.putrequest("POST", "/profile")  # announce a body over the limit: refused before it is sent
    conn.putheader("Authorization", f"Bearer {TOKEN}")
    conn.putheader("Content-Length", str(3 * 2**20))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and "over the agent's limit" in json.loads(resp.read())["error"]
    conn.close()
    assert post(agent.url, b"x", query="?repeats=0")[0] == 400
    assert post(agent.url, b"x", query="?bogus=1")[0] == 400

    damaged = tmp_path / "damaged"
    shutil.copytree(ort_artifact, damaged)
    (damaged / "session.json").write_text("{}")
    status, body = post(agent.url, pack_artifact(damaged, read_manifest(damaged)))
    assert status == 422 and "damaged" in body["error"]


def test_agent_cli_end_to_end(ort_artifact, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "EDGEOPT_AGENT_TOKEN"}
    no_token = cli("agent", "--port", 0, env=env)
    assert no_token.returncode == 2 and "needs a token" in no_token.stderr
    proc = subprocess.Popen([sys.executable, "-m", "edgeopt.cli", "agent", "--port", "0", "--token", TOKEN],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("edgeopt agent listening on http://127.0.0.1:"), line
        url = line.split()[-1]
        p = cli("profile", ort_artifact, "--device", url, "--json", "--threads", 1, "--repeats", 20, "--warmup", 2,
                "--profiles-dir", tmp_path / "pr", env={**env, "EDGEOPT_AGENT_TOKEN": TOKEN})
        assert p.returncode == 0, p.stderr
        assert Profile.model_validate_json(p.stdout).device == url
        assert len(list((tmp_path / "pr" / "x86-cpu").glob("*.json"))) == 1
        bad = cli("profile", ort_artifact, "--device", url, "--token", "nope-nope", env=env)
        assert bad.returncode == 2 and "rejected the token (HTTP 401)" in bad.stderr
    finally:
        proc.terminate()
        proc.wait(10)


def test_parse_device_ca_cert_only_for_https():
    from edgeopt.errors import EdgeoptError
    from edgeopt.remote import AgentDevice, parse_device

    d = parse_device("https://lab-board:9000", token="t" * 16, ca_cert="/etc/lab-ca.pem")
    assert isinstance(d, AgentDevice) and d.ca_cert == "/etc/lab-ca.pem" and d.url == "https://lab-board:9000"
    with pytest.raises(EdgeoptError, match="applies to https:// agents"):
        parse_device("http://lab-board:9000", token="t" * 16, ca_cert="/etc/lab-ca.pem")
