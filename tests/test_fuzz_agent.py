"""The device agent against hostile uploads and connections (all on 127.0.0.1, port 0).

What a token holder may upload is checked before anything runs: no code from the artifact (TensorRT's
build_engine.py), OpenVINO properties from an allow-list, manifest paths inside the artifact, archives streamed
with member/size limits.  Connections have timeouts, a bounded worker pool and a deep listen queue.  A fixed-seed
fuzz of malformed requests must get well-formed JSON 4xx answers, leave no files behind and no threads running.
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import importlib.util
import inspect
import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import onnx
import pytest

from edgeopt import agent as agent_mod
from edgeopt.agent import BadRequest, check_token, make_server, safe_extract
from edgeopt.backends import get
from edgeopt.backends.base import read_manifest, read_verified
from edgeopt.backends.openvino import read_compile_spec
from edgeopt.backends.tensorrt import build_config, read_build_config
from edgeopt.errors import EdgeoptError
from edgeopt.remote import AgentDevice, pack_artifact, parse_device

TOKEN = "fuzz-token-0123456789abcdef"
FAST = {"threads": 1, "warmup": 1, "repeats": 5}


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def start_agent():
    servers = []

    def start(**kw):
        kw.setdefault("max_upload_bytes", 2 * 2**20)
        kw.setdefault("quiet", True)
        server = make_server("127.0.0.1", 0, TOKEN, **kw)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append((server, thread))
        return server

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(10)


def connection_threads(port: int | None = None) -> int:
    """The agent's connection threads alive (of the agent on ``port``, or of any)."""
    prefix = f"edgeopt-agent-{port}-" if port else "edgeopt-agent-"
    return sum(t.name.startswith(prefix) for t in threading.enumerate())


def wait_threads(count: int, limit_s: float = 15.0) -> int:
    """threading.active_count() once it is down to ``count`` (or after ``limit_s``)."""
    end = time.monotonic() + limit_s
    while threading.active_count() > count and time.monotonic() < end:
        time.sleep(0.05)
    return threading.active_count()


def quiet_baseline() -> int:
    """threading.active_count() once connection threads of earlier tests' agents have ended."""
    end = time.monotonic() + 15
    while connection_threads() and time.monotonic() < end:
        time.sleep(0.05)
    return threading.active_count()


def exchange(port: int, data: bytes, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, half-close, read the answer to EOF: (status, headers, body); status 0 when none came."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server answered and closed before taking everything
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    finally:
        s.close()
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/1."):
        return 0, {}, raw
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, body[: int(headers.get("content-length", len(body)))]


def post_raw(port: int, body: bytes, *, query: str = "", auth: str | None = f"Bearer {TOKEN}",
             extra: str = "", length: str | None = None) -> bytes:
    head = f"POST /profile{query} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if auth is not None:
        head += f"Authorization: {auth}\r\n"
    head += f"Content-Length: {len(body) if length is None else length}\r\n" + extra
    return head.encode("utf-8") + b"\r\n" + body


def tar_gz(files: dict[str, bytes], members: list[tarfile.TarInfo] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        for m in members:
            t.addfile(m)
    return buf.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def artifact_upload(manifest: dict, files: dict[str, bytes], *, rehash: bool = True) -> bytes:
    """An uploaded artifact: ``files`` plus a manifest (its file hashes recomputed from ``files`` unless not asked)."""
    m = dict(manifest)
    if rehash:
        m["files"] = {k: sha(v) for k, v in files.items()}
    return tar_gz({"manifest.json": json.dumps(m).encode(), **files})


def crafted_manifest(ort_artifact: Path, backend: str, primary: str) -> dict:
    m = read_manifest(ort_artifact).model_dump(mode="json")
    m.update(backend=backend, primary=primary, created_utc=dt.datetime.now(dt.timezone.utc).isoformat())
    return m


def assert_json_refusal(status: int, headers: dict, body: bytes, case: str) -> dict:
    assert 400 <= status < 500 or status in (503, 505), (case, status, body[:300])
    assert headers.get("content-type") == "application/json", (case, headers)
    assert b"Traceback" not in body and b'File "' not in body, (case, body[:300])
    payload = json.loads(body)
    assert isinstance(payload.get("error"), str) and payload["error"] and "\n" not in payload["error"], (case, payload)
    return payload


# --------------------------------------------------------------------------- 1. no code from the upload (TensorRT)


FAKE_TENSORRT = '''
"""A stand-in for TensorRT: records what edgeopt's builder asks of it; the build 'fails' (no engine)."""
__version__ = "10.0.0"
CALLS = []

class Logger:
    WARNING = 2
    def __init__(self, level): pass

class _Flags:
    def __getattr__(self, name): return name

BuilderFlag = _Flags()
class MemoryPoolType: WORKSPACE = "workspace"
class DeviceType: DLA = "dla"

class OnnxParser:
    num_errors = 0
    def __init__(self, network, logger): pass
    def parse_from_file(self, path):
        CALLS.append(("parse", path)); return True

class _Config:
    def set_memory_pool_limit(self, pool, size): CALLS.append(("workspace", size))
    def set_flag(self, flag): CALLS.append(("flag", flag))
    def add_optimization_profile(self, profile): pass

class _Profile:
    def set_shape(self, name, a, b, c): CALLS.append(("shape", name, list(a)))

class Builder:
    def __init__(self, logger): pass
    def create_network(self, flags): return object()
    def create_builder_config(self): return _Config()
    def create_optimization_profile(self): return _Profile()
    def build_serialized_network(self, network, config):
        CALLS.append(("build",)); return None
'''


@pytest.fixture
def fake_tensorrt(tmp_path, monkeypatch):
    """A 'tensorrt' module importable here (in sys.modules, with a spec), so the engine-build-on-load path runs."""
    pkg = tmp_path / "fake_site" / "tensorrt"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKE_TENSORRT)
    monkeypatch.syspath_prepend(str(tmp_path / "fake_site"))
    spec = importlib.util.spec_from_file_location("tensorrt", pkg / "__init__.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setitem(sys.modules, "tensorrt", mod)
    assert get("tensorrt").BACKEND.is_available()
    return mod


def trt_files(ort_artifact: Path, sentinel: Path, **build_overrides) -> tuple[dict, dict[str, bytes]]:
    plan = read_manifest(ort_artifact).plan
    cfg = {**build_config(plan, has_qdq=False), "passes": [], **build_overrides}
    script = f"import pathlib\npathlib.Path({str(sentinel)!r}).write_text('the artifact ran code')\n"
    files = {"model.onnx": (ort_artifact / "model.onnx").read_bytes(), "build.json": json.dumps(cfg).encode(),
             "build_engine.py": script.encode()}
    return crafted_manifest(ort_artifact, "tensorrt", "model.onnx"), files


def test_tensorrt_engine_build_never_runs_the_artifacts_script(start_agent, ort_artifact, fake_tensorrt, tmp_path):
    sentinel = tmp_path / "sentinel-written-by-upload"
    manifest, files = trt_files(ort_artifact, sentinel)
    server = start_agent()
    status, headers, body = exchange(server.server_address[1], post_raw(server.server_address[1],
                                                                        artifact_upload(manifest, files)))
    payload = assert_json_refusal(status, headers, body, "trt")
    assert status == 422 and "TensorRT failed to build the engine" in payload["error"], payload
    assert ("build",) in fake_tensorrt.CALLS  # edgeopt's own builder ran (in-process), on the checked build.json
    assert any(c[0] == "parse" and c[1].endswith("model.onnx") for c in fake_tensorrt.CALLS)
    assert not sentinel.exists()

    # the same through the backend directly (e.g. `edgeopt profile --device local`)
    art_dir = tmp_path / "trt-art"
    art_dir.mkdir()
    for name, data in files.items():
        (art_dir / name).write_bytes(data)
    (art_dir / "manifest.json").write_text(json.dumps({**manifest, "files": {k: sha(v) for k, v in files.items()}}))
    with pytest.raises(EdgeoptError, match="failed to build the engine"):
        get("tensorrt").BACKEND.load(read_verified(art_dir), art_dir)
    assert not sentinel.exists()


@pytest.mark.parametrize("override, key", [
    ({"flags": ["FP16", "os.system"]}, "flags"),
    ({"engine": "../../evil.engine"}, "engine"),
    ({"onnx": "/etc/passwd.onnx"}, "absolute"),
    ({"onnx": "../model.onnx"}, "'..'"),
    ({"workspace_bytes": "1GB"}, "workspace_bytes"),
    ({"dla_core": -1}, "dla_core"),
    ({"input_shapes": {"image": [1, "x"]}}, "input_shapes"),
    ({"plugins": ["/tmp/libevil.so"]}, "unknown key 'plugins'"),
])
def test_tensorrt_build_json_is_checked(tmp_path, ort_artifact, override, key):
    _, files = trt_files(ort_artifact, tmp_path / "never", **override)
    (tmp_path / "build.json").write_bytes(files["build.json"])
    with pytest.raises(EdgeoptError, match=key.replace("(", r"\(")) as e:
        read_build_config(tmp_path)
    assert "\n" not in str(e.value)


def test_tensorrt_build_json_settings_pass(tmp_path, ort_artifact):
    _, files = trt_files(ort_artifact, tmp_path / "never")
    (tmp_path / "build.json").write_bytes(files["build.json"])
    cfg = read_build_config(tmp_path)
    assert cfg["onnx"] == "model.onnx" and cfg["engine"] == "model.engine" and cfg["input_shapes"] == {"image": [1, 1, 8, 8]}


# --------------------------------------------------------------------------- 2. OpenVINO compile.json allow-list


def write_compile(folder: Path, spec) -> Path:
    (folder / "compile.json").write_text(json.dumps(spec))
    return folder


@pytest.mark.parametrize("spec, message", [
    ({"device": "CPU", "config": {"CACHE_DIR": "/tmp/x"}}, "'CACHE_DIR' is not allowed; valid properties: INFERENCE_PRECISION_HINT"),
    ({"device": "CPU", "config": {"INFERENCE_PRECISION_HINT": "f64"}}, "INFERENCE_PRECISION_HINT"),
    ({"device": "CPU", "config": {"INFERENCE_NUM_THREADS": "4"}}, "INFERENCE_NUM_THREADS"),
    ({"device": "CPU", "config": {"PERF_COUNT": 1}}, "PERF_COUNT"),
    ({"device": "../../CPU", "config": {}}, "device"),
    ({"device": "CPU", "config": [], "notes": []}, "config must be a JSON object"),
    ({"device": "CPU", "config": {}, "cache": "/tmp"}, "unknown key 'cache'"),
    ([1, 2], "JSON object"),
])
def test_openvino_compile_json_allow_list(tmp_path, spec, message):
    with pytest.raises(EdgeoptError, match=message) as e:
        read_compile_spec(write_compile(tmp_path, spec))
    assert "\n" not in str(e.value)


def test_openvino_compile_json_as_edgeopt_writes_it(tmp_path):
    spec = {"device": "CPU", "config": {"INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": None,
                                       "PERF_COUNT": "YES", "PERFORMANCE_HINT": "LATENCY"}, "notes": ["x"]}
    assert read_compile_spec(write_compile(tmp_path, spec))["config"]["INFERENCE_PRECISION_HINT"] == "bf16"
    (tmp_path / "compile.json").write_text("{not json")
    with pytest.raises(EdgeoptError, match="not readable JSON"):
        read_compile_spec(tmp_path)


def test_agent_refuses_openvino_cache_dir(start_agent, ort_artifact, tmp_path):
    cache = tmp_path / "ov-cache-outside"
    compile_json = {"device": "CPU", "config": {"INFERENCE_PRECISION_HINT": "f32", "CACHE_DIR": str(cache)}, "notes": []}
    files = {"model.xml": b"<net/>", "model.bin": b"\0" * 8, "compile.json": json.dumps(compile_json).encode()}
    server = start_agent()
    port = server.server_address[1]
    status, headers, body = exchange(port, post_raw(port, artifact_upload(crafted_manifest(ort_artifact, "openvino",
                                                                                           "model.xml"), files)))
    payload = assert_json_refusal(status, headers, body, "ov")
    assert status == 422 and "CACHE_DIR" in payload["error"] and "valid properties" in payload["error"]
    assert not cache.exists()


# --------------------------------------------------------------------------- 3. manifest paths


def write_artifact(folder: Path, manifest: dict, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize("primary, files, why", [
    ("ABS", None, "is absolute"),
    ("model.onnx", {"ABS": None}, "is absolute"),
    ("model.onnx", {"../outside.onnx": None}, "'..'"),
    ("model.onnx", {"sub/../../outside.onnx": None}, "'..'"),
    ("C:/model.onnx", None, "drive letter"),
    ("sub\\model.onnx", None, "backslash"),
    ("other.onnx", None, "not one of the artifact's files"),
])
def test_manifest_paths_stay_inside(tmp_path, ort_artifact, primary, files, why):
    foreign = tmp_path / "foreign.onnx"
    shutil.copy(ort_artifact / "model.onnx", foreign)
    m = read_manifest(ort_artifact).model_dump(mode="json")
    m["primary"] = str(foreign) if primary == "ABS" else primary
    if files:
        m["files"] = {**m["files"], **{(str(foreign) if k == "ABS" else k): sha(foreign.read_bytes()) for k in files}}
    art = tmp_path / "art"
    shutil.copytree(ort_artifact, art)
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EdgeoptError, match=why) as e:
        read_verified(art)
    assert "\n" not in str(e.value)


def test_manifest_symlink_out_of_the_artifact_is_refused(tmp_path, ort_artifact):
    art = tmp_path / "art"
    shutil.copytree(ort_artifact, art)
    outside = tmp_path / "outside.onnx"
    shutil.move(art / "model.onnx", outside)
    (art / "model.onnx").symlink_to(outside)
    with pytest.raises(EdgeoptError, match="resolves outside"):
        read_manifest(art)
    (art / "model.onnx").unlink()
    (art / "inner").mkdir()
    shutil.move(outside, art / "inner" / "model.onnx")
    (art / "model.onnx").symlink_to(art / "inner" / "model.onnx")  # a link inside the artifact is fine
    assert read_verified(art).primary == "model.onnx"


def test_agent_does_not_open_foreign_files(start_agent, ort_artifact, tmp_path):
    foreign = tmp_path / "foreign.onnx"
    shutil.copy(ort_artifact / "model.onnx", foreign)
    inputs = [i.name for i in onnx.load(str(foreign)).graph.input]
    server = start_agent()
    port = server.server_address[1]
    base = read_manifest(ort_artifact).model_dump(mode="json")
    session = (ort_artifact / "session.json").read_bytes()
    for primary, files in ((str(foreign), {"session.json": sha(session)}),
                           ("model.onnx", {"session.json": sha(session), "model.onnx": sha(b"x"), str(foreign): sha(b"y")}),
                           ("model.onnx", {"session.json": sha(session), "../foreign.onnx": sha(b"y")})):
        m = {**base, "primary": primary, "files": files}
        status, headers, body = exchange(port, post_raw(port, tar_gz({"manifest.json": json.dumps(m).encode(),
                                                                      "session.json": session})))
        payload = assert_json_refusal(status, headers, body, primary)
        assert status == 422 and "inside the artifact" in payload["error"], payload
        assert not any(name in payload["error"] for name in inputs)


# --------------------------------------------------------------------------- 5. archives stream with limits


def test_too_many_members_is_refused_before_reading_them_all(tmp_path, monkeypatch):
    monkeypatch.setattr(agent_mod, "MAX_MEMBERS", 20)
    data = tar_gz({f"f{i}.txt": b"x" for i in range(500)})
    seen = []
    real_next = tarfile.TarFile.next

    def counting_next(self):
        m = real_next(self)
        seen.append(m)
        return m

    monkeypatch.setattr(tarfile.TarFile, "next", counting_next)
    with pytest.raises(BadRequest, match="more than 20 members") as e:
        safe_extract(data, tmp_path, max_bytes=1 << 20)
    assert e.value.status == 400 and len(seen) <= 22  # refused at member 21 of 500


def test_huge_declared_size_is_refused_before_writing(tmp_path):
    info = tarfile.TarInfo("big.bin")
    info.size = 10**12
    data = gzip.compress(info.tobuf(format=tarfile.GNU_FORMAT) + b"\0" * 4096)
    with pytest.raises(BadRequest, match="unpacks to more than") as e:
        safe_extract(data, tmp_path, max_bytes=8 << 20)
    assert e.value.status == 413 and not (tmp_path / "big.bin").exists()

    second = tar_gz({"a.bin": b"a" * 600_000, "b.bin": b"b" * 600_000})  # each fits, together they do not
    dest = tmp_path / "two"
    dest.mkdir()
    with pytest.raises(BadRequest, match="unpacks to more than"):
        safe_extract(second, dest, max_bytes=1_000_000)
    assert not (dest / "b.bin").exists()


def test_header_bomb_and_truncated_gzip_are_bounded(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo("a.txt")
        info.pax_headers = {"comment": "x" * (3 << 20)}  # read into memory by tarfile: bounded
        t.addfile(info, io.BytesIO(b""))
    with pytest.raises(BadRequest, match="headers are over"):
        safe_extract(gzip.compress(buf.getvalue()), tmp_path, max_bytes=64 << 20)
    good = tar_gz({"a.txt": b"hello" * 1000})
    with pytest.raises(BadRequest, match="not a valid tar"):
        safe_extract(good[: len(good) // 2], tmp_path, max_bytes=1 << 20)
    (tmp_path / "ok").mkdir()
    safe_extract(good, tmp_path / "ok", max_bytes=1 << 20)
    assert (tmp_path / "ok" / "a.txt").read_bytes() == b"hello" * 1000


# --------------------------------------------------------------------------- 6. tokens


@pytest.mark.parametrize("token, message", [
    ("", "needs a token"), ("        ", "only whitespace"), ("short-token", "at least 16 characters"),
    (" padded-token-0123456789 ", "printable ASCII without spaces"), ("tab\ttoken-0123456789", "printable ASCII"),
])
def test_weak_tokens_are_refused(token, message):
    with pytest.raises(EdgeoptError, match=message):
        check_token(token)
    with pytest.raises(EdgeoptError, match=message):
        make_server("127.0.0.1", 0, token)


def test_cli_refuses_a_whitespace_token_and_bad_tls_files(tmp_path):
    env = {"PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "edgeopt.cli", "agent", "--port", "0", "--token", " " * 8],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "only whitespace" in proc.stderr and "16" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "edgeopt.cli", "agent", "--port", "0", "--token", TOKEN,
                           "--tls-cert", str(tmp_path / "no.pem"), "--tls-key", str(tmp_path / "no.key")],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2 and "cannot load the TLS certificate" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- 4. connections


def test_half_sent_and_slow_connections_are_bounded(start_agent):
    baseline = quiet_baseline()
    server = start_agent(timeout=1.0, max_workers=4, queue_wait=0.2, min_body_rate=1 << 20)
    port = server.server_address[1]
    with_server = threading.active_count()
    assert with_server == baseline + 1
    socks = []
    peak = peak_named = 0
    for _ in range(12):
        s = socket.create_connection(("127.0.0.1", port), timeout=20)
        s.sendall(b"POST /profile HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")  # and nothing more
        socks.append(s)
        peak, peak_named = max(peak, threading.active_count() - with_server), max(peak_named, connection_threads(port))
    for _ in range(5):
        time.sleep(0.05)
        peak, peak_named = max(peak, threading.active_count() - with_server), max(peak_named, connection_threads(port))
    assert peak <= 4 and peak_named == 4  # the pool is used, and never more handler threads than the pool
    answers = []
    for s in socks:  # each is closed by the server (a client timeout here would fail the test)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        answers.append(data)
        s.close()
    refused = [a for a in answers if a]
    assert all(a.startswith(b"HTTP/1.1 503") and b'"error"' in a for a in refused)
    assert len(refused) < len(answers)  # the others were served, then timed out

    # a body trickled below the minimum rate gets 408 once its first `timeout` s are over
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    s.sendall(post_raw(port, b"", length="100000"))
    answer = b""
    for _ in range(100):
        try:
            s.sendall(b"x")
        except OSError:
            break
        s.settimeout(0.1)
        try:
            answer += s.recv(65536)
        except TimeoutError:
            continue
        if answer:
            break
    s.settimeout(20)
    try:
        while chunk := s.recv(65536):
            answer += chunk
    except ConnectionResetError:
        pass
    s.close()
    assert answer.startswith(b"HTTP/1.1 408") and b"too slowly" in answer, answer[:200]
    assert wait_threads(with_server) == with_server


def test_many_parallel_health_requests_all_answered(start_agent):
    import http.client

    server = start_agent()
    port = server.server_address[1]
    n = 150
    barrier = threading.Barrier(n)
    results: list[object] = [None] * n

    def one(i: int) -> None:
        barrier.wait()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("GET", "/health", headers={"Connection": "close"})
            r = conn.getresponse()
            results[i] = (r.status, json.loads(r.read())["status"])
            conn.close()
        except Exception as e:  # noqa: BLE001 - recorded and asserted below
            results[i] = repr(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [(200, "ok")] * n, [r for r in results if r != (200, "ok")][:5]


# --------------------------------------------------------------------------- 7. TLS


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (cryptography, else the openssl CLI)."""
    cert, key = folder / "agent.pem", folder / "agent.key"
    try:
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        if not shutil.which("openssl"):
            pytest.skip("neither the cryptography package nor the openssl CLI is available to make a test certificate")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                        "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
        return cert, key
    k = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    c = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(k.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
         .not_valid_after(now + dt.timedelta(days=2))
         .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
         .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
         .sign(k, hashes.SHA256()))
    cert.write_bytes(c.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return cert, key


def test_tls_agent(start_agent, ort_artifact, tmp_path, monkeypatch):
    cert, key = self_signed(tmp_path)
    with pytest.raises(EdgeoptError, match="go together"):
        make_server("127.0.0.1", 0, TOKEN, tls_cert=cert)
    server = start_agent(tls_cert=cert, tls_key=key, timeout=5.0)
    assert server.url.startswith("https://127.0.0.1:")
    monkeypatch.delenv("EDGEOPT_AGENT_CA", raising=False)
    with pytest.raises(EdgeoptError, match=r"(?i)certificate verify failed.*EDGEOPT_AGENT_CA"):
        AgentDevice(server.url, TOKEN).request("/health")
    monkeypatch.setenv("EDGEOPT_AGENT_CA", str(cert))
    dev = parse_device(server.url, token=TOKEN)
    assert isinstance(dev, AgentDevice) and dev.request("/health")["status"] == "ok"
    p = dev.profile(ort_artifact, **FAST)
    assert p.device == server.url and p.repeats == 5
    status, _, _ = exchange(server.server_address[1], b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", timeout=20)
    assert status == 0  # plain HTTP to the TLS port: no answer, and the agent keeps serving
    assert AgentDevice(server.url, TOKEN, ca_cert=str(cert)).request("/health")["status"] == "ok"


# --------------------------------------------------------------------------- 8. fuzz


def fuzz_cases(rng: random.Random, port: int, ort_artifact: Path, tmp_path: Path) -> list[tuple[str, bytes, set[int]]]:
    """(name, raw request, acceptable statuses): every one a client error."""
    cases: list[tuple[str, bytes, set[int]]] = []
    any4 = set(range(400, 500)) | {505}
    printable = [c for c in range(33, 127)]
    for i in range(15):  # garbage request lines
        line = bytes(rng.choice(printable) for _ in range(rng.randint(1, 60)))
        if rng.random() < 0.5:
            line += b" " + bytes(rng.randint(128, 255) for _ in range(rng.randint(1, 20)))
        cases.append((f"request-line-{i}", line + b"\r\n\r\n", any4))
    for i in range(15):  # garbage bodies
        body = rng.randbytes(rng.randint(0, 4000))
        cases.append((f"garbage-body-{i}", post_raw(port, body), {400}))
    good = pack_artifact(ort_artifact, read_manifest(ort_artifact))
    for i in range(10):  # truncated gzip
        cases.append((f"truncated-gzip-{i}", post_raw(port, good[: rng.randint(1, int(len(good) * 0.9))]), {400, 422}))
    for v in ("abc", "-1", "1e3", "", "+5", "5_0", "0x10", " 12 x", "99999999999999999999", "١٢"):
        cases.append((f"content-length {v!r}", post_raw(port, b"x", length=v), {400}))
    cases += [
        ("two content-lengths", post_raw(port, b"xx", extra="Content-Length: 1\r\n"), {400}),
        ("content-length over the body", post_raw(port, b"x" * 10, length="500"), {400}),
        ("content-length over the limit", post_raw(port, b"", length=str(50 * 2**20)), {413}),
        ("no content-length", f"POST /profile HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode(), {411}),
        ("chunked", f"POST /profile HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nTransfer-Encoding: chunked"
                    "\r\n\r\n1\r\nx\r\n0\r\n\r\n".encode(), {411}),
    ]
    for auth in ("Basic dXNlcjpwYXNz", f"Token {TOKEN}", "Bearer", "Bearer ", f"Bearer  {TOKEN}", f"Bearer {TOKEN[:-1]}",
                 "Digest x", "", "Bearer " + "é" * 20, f"BearerX {TOKEN}", "Bearer " + "A" * 5000, None):
        cases.append((f"auth {str(auth)[:30]!r}", post_raw(port, b"x", auth=auth), {401}))
    cases.append(("two authorizations", post_raw(port, b"x", extra=f"Authorization: Bearer {TOKEN}\r\n"), {401}))
    cases += [
        ("huge request line", b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", {414}),
        ("huge header", b"GET /health HTTP/1.1\r\nX-Big: " + b"b" * 70000 + b"\r\n\r\n", {431}),
        ("many headers", b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n", {431}),
        ("http/2.0", b"GET /health HTTP/2.0\r\n\r\n", {505}),
        ("put", b"PUT /profile HTTP/1.1\r\nContent-Length: 0\r\n\r\n", {405}),
        ("delete", b"DELETE /health HTTP/1.1\r\n\r\n", {405}),
        ("head", b"HEAD /health HTTP/1.1\r\n\r\n", {405}),
        ("get unknown", b"GET /../../etc/passwd HTTP/1.1\r\n\r\n", {404}),
        ("post health", b"POST /health HTTP/1.1\r\nContent-Length: 1\r\n\r\nx", {404}),
        ("http/0.9 post", b"POST /profile\r\n\r\n", {400}),
    ]
    for q in ("?bogus=1", "?repeats=abc", "?repeats=0", "?threads=99999", "?warmup=-1", "?repeats=1&repeats=x",
              "?" + "&".join(f"a{i}=1" for i in range(50)), "?repeats=%00", "?threads=1e3", "?warmup= 5"):
        cases.append((f"query {q[:30]!r}", post_raw(port, b"x", query=q), {400}))

    def link(kind: bytes, name: str = "manifest.json", target: str = "/etc/passwd") -> tarfile.TarInfo:
        m = tarfile.TarInfo(name)
        m.type, m.linkname = kind, target
        return m

    outside = tmp_path / "written-outside.txt"
    archives = {
        "absolute member": (tar_gz({str(outside): b"x"}), {400}),
        "dotdot member": (tar_gz({"../../written-outside.txt": b"x"}), {400}),
        "symlink member": (tar_gz({}, [link(tarfile.SYMTYPE)]), {400}),
        "hardlink member": (tar_gz({}, [link(tarfile.LNKTYPE, target="x")]), {400}),
        "device member": (tar_gz({}, [link(tarfile.CHRTYPE, "dev", "")]), {400}),
        "fifo member": (tar_gz({}, [link(tarfile.FIFOTYPE, "fifo", "")]), {400}),
        "too many members": (tar_gz({f"m{i}": b"" for i in range(60)}), {400}),
        "gzip bomb": (tar_gz({"zeros.bin": bytes(20 << 20)}), {413}),
        "no manifest": (tar_gz({"hello.txt": b"hi"}), {400}),
        "manifest is a folder": (tar_gz({"manifest.json/x": b"{}"}), {400}),
        "file then folder": (tar_gz({"a": b"1", "a/b": b"2"}), {400}),
    }
    m = read_manifest(ort_artifact).model_dump(mode="json")
    session = (ort_artifact / "session.json").read_bytes()
    bad_manifests = {
        "manifest not json": b"{not json",
        "manifest not utf-8": b"\xff\xfe\x00{",
        "manifest a list": b"[1, 2, 3]",
        "manifest empty object": b"{}",
        "manifest wrong types": json.dumps({**m, "files": [1, 2], "size_bytes": "big"}).encode(),
        "manifest missing plan": json.dumps({k: v for k, v in m.items() if k != "plan"}).encode(),
        "manifest schema 2": json.dumps({**m, "schema_version": 2}).encode(),
        "manifest files not strings": json.dumps({**m, "files": {"session.json": 5}}).encode(),
        "manifest primary null": json.dumps({**m, "primary": None}).encode(),
        "manifest primary dot": json.dumps({**m, "primary": ".", "files": {"session.json": sha(session)}}).encode(),
    }
    for name, data in bad_manifests.items():
        archives[name] = (tar_gz({"manifest.json": data, "session.json": session}), {422})
    for backend in ("evil", "../onnxruntime", "", "tensorrt\n"):
        archives[f"backend {backend!r}"] = (artifact_upload({**m, "backend": backend}, {"model.onnx": b"x"}), {422})
    archives["damaged"] = (artifact_upload(m, {"model.onnx": b"x", "session.json": session}, rehash=False), {422})
    archives["session.json garbage"] = (artifact_upload(m, {"model.onnx": (ort_artifact / "model.onnx").read_bytes(),
                                                            "session.json": b"\x00garbage"}), {422})
    archives["model garbage"] = (artifact_upload(m, {"model.onnx": rng.randbytes(300), "session.json": session}), {422})
    for name, (data, ok) in archives.items():
        cases.append((name, post_raw(port, data), ok))
    rng.shuffle(cases)
    return cases


def test_fuzzed_requests_get_clean_json_refusals(start_agent, ort_artifact, tmp_path, monkeypatch):
    agent_tmp = tmp_path / "agent-tmp"
    agent_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(agent_tmp))
    baseline = quiet_baseline()
    server = start_agent(max_members=50, timeout=5.0)
    port = server.server_address[1]
    with_server = threading.active_count()
    assert with_server == baseline + 1
    cases = fuzz_cases(random.Random(20240611), port, ort_artifact, tmp_path)
    assert 100 <= len(cases) <= 200
    failures = []
    for name, raw, ok in cases:
        status, headers, body = exchange(port, raw)
        try:
            assert_json_refusal(status, headers, body, name)
            assert status in ok, f"expected {sorted(ok)}"
        except (AssertionError, ValueError) as e:
            failures.append((name, status, body[:200], str(e)[:200]))
    assert not failures, failures
    status, headers, body = exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200 and json.loads(body)["status"] == "ok"
    assert not (tmp_path / "written-outside.txt").exists()
    assert list(agent_tmp.iterdir()) == []  # every request's folder was removed; nothing else written there
    assert wait_threads(with_server) == with_server


def test_a_real_upload_still_profiles(start_agent, ort_artifact):
    server = start_agent()
    p = AgentDevice(server.url, TOKEN).profile(ort_artifact, **FAST)
    assert p.device == server.url and p.latency_ms["p50"] > 0
    assert server.url.startswith("http://127.0.0.1:")


def test_shipped_build_script_is_the_in_process_builder(tmp_path, fake_tensorrt):
    """build_engine.py (for building by hand) carries serialize_engine's own source: the same builder calls."""
    from edgeopt.backends.tensorrt import build_script, serialize_engine

    assert inspect.getsource(serialize_engine) in build_script()
    d = tmp_path / "art"
    d.mkdir()
    (d / "model.onnx").write_bytes(b"")
    cfg = {"onnx": "model.onnx", "engine": "model.engine", "flags": ["FP16"], "workspace_bytes": 1 << 20,
           "dla_core": None, "input_shapes": {"x": [1, 8]}}
    (d / "build.json").write_text(json.dumps(cfg))
    (d / "build_engine.py").write_text(build_script())
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "fake_site")}
    proc = subprocess.run([sys.executable, str(d / "build_engine.py")], capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() == \
        "error: TensorRT failed to build the engine (see its log above)", proc.stderr
