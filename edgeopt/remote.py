"""Devices a profile runs on: this machine, a host over SSH, an Android device over adb, an edgeopt agent.

Device strings (``edgeopt profile --device``):

* ``local``: this machine, in the artifact's runtime;
* ``ssh://[user@]host[:port]``: copies the artifact to a temporary directory on the host
  with ``scp``, runs ``python3 -m edgeopt.cli profile DIR --device local --json`` there
  (edgeopt and the artifact's runtime must be installed on the host) and reads the
  profile back.  Uses the OpenSSH client (``ssh``/``scp`` on PATH, your ssh config and
  keys; never prompts: BatchMode).  ``$EDGEOPT_SSH_OPTIONS`` adds options to both
  (e.g. ``-i key -o UserKnownHostsFile=...``), ``$EDGEOPT_REMOTE_PYTHON`` replaces
  ``python3`` (a command prefix, e.g. ``~/venv/bin/python``);
* ``adb:SERIAL``: pushes the artifact to ``/data/local/tmp/edgeopt/<hash>/`` with
  ``adb -s SERIAL push`` (adb from ``$ADB``, else PATH).  TFLite artifacts run in the
  stock ``benchmark_model`` binary when it is on the device
  (``$EDGEOPT_ADB_BENCHMARK``, default ``/data/local/tmp/benchmark_model``), anything
  else through ``python3 -m edgeopt.cli`` in ``adb shell`` (``$EDGEOPT_ADB_PYTHON``;
  e.g. Termux's Python with edgeopt installed);
* ``http://host:port`` or ``https://host:port``: an ``edgeopt agent`` (see :mod:`edgeopt.agent`), with a bearer
  token (``--token`` or ``$EDGEOPT_AGENT_TOKEN``).  HTTP proxies are bypassed.  ``https://`` (an agent started
  with ``--tls-cert``/``--tls-key``) checks the agent's certificate against ``$EDGEOPT_AGENT_CA`` (a PEM file,
  e.g. its self-signed certificate) or else the system's trusted CAs.

Each remote profile comes back with its ``device`` set to the device string; it is
saved on this machine.  ``$EDGEOPT_REMOTE_TIMEOUT`` bounds each remote step (s, default 900).
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import tarfile
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from .errors import EdgeoptError
from .types import Artifact, OpTiming, Profile

VALID_FORMS = "local, ssh://[user@]host[:port], adb:SERIAL, http://host:port, https://host:port"
ADB_ROOT = "/data/local/tmp/edgeopt"
ADB_BENCHMARK = "/data/local/tmp/benchmark_model"
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_SERIAL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")


def _timeout() -> float:
    try:
        return float(os.environ.get("EDGEOPT_REMOTE_TIMEOUT", "900"))
    except ValueError as e:
        raise EdgeoptError(f"$EDGEOPT_REMOTE_TIMEOUT must be a number of seconds, not {os.environ['EDGEOPT_REMOTE_TIMEOUT']!r}") from e


class Device(ABC):
    spec: str

    @property
    def slug(self) -> str:
        from .profiling import device_slug

        return device_slug(self.spec)

    @abstractmethod
    def profile(self, artifact_dir: Path, *, threads: int | None = None, warmup: int = 10, repeats: int = 100) -> Profile:
        """Measure the artifact on this device; the profile's ``device`` is :attr:`spec`."""


class LocalDevice(Device):
    spec = "local"

    def profile(self, artifact_dir: Path, *, threads: int | None = None, warmup: int = 10, repeats: int = 100) -> Profile:
        from .profiling import profile_local

        return profile_local(artifact_dir, threads=threads, warmup=warmup, repeats=repeats)


def parse_device(spec: str, token: str | None = None, ca_cert: str | None = None) -> Device:
    """The device a ``--device`` string names; a one-line error listing the valid forms otherwise.

    ``ca_cert``: for ``https://`` agents, the PEM file their certificate is checked against (else
    ``$EDGEOPT_AGENT_CA``, else the system's trusted CAs)."""
    s = spec.strip()
    bad = EdgeoptError(f"bad device '{spec}'; valid forms: {VALID_FORMS}")
    if s == "local":
        return LocalDevice()
    if s.startswith("ssh://"):
        try:
            u = urlsplit(s)
            port = u.port
        except ValueError:
            raise bad from None
        if (not u.hostname or not _HOST.fullmatch(u.hostname) or u.path not in ("", "/") or u.query or u.fragment
                or u.password is not None or (u.username is not None and not _USER.fullmatch(u.username))):
            raise bad
        return SshDevice(u.hostname, user=u.username, port=port)
    if s.startswith("adb:"):
        serial = s[4:]
        if not _SERIAL.fullmatch(serial):
            raise bad
        return AdbDevice(serial)
    if s.startswith(("http://", "https://")):
        try:
            u = urlsplit(s)
            port = u.port
        except ValueError:
            raise bad from None
        if not u.hostname or u.path not in ("", "/") or u.query or u.fragment or u.username is not None:
            raise bad
        token = token or os.environ.get("EDGEOPT_AGENT_TOKEN")
        if not token:
            raise EdgeoptError(f"device {s} is an edgeopt agent: give its token with --token or $EDGEOPT_AGENT_TOKEN")
        host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
        if ca_cert is not None and u.scheme != "https":
            raise EdgeoptError(f"--ca-cert applies to https:// agents, not {s}")
        return AgentDevice(f"{u.scheme}://{host}:{port or 8765}", token, ca_cert=str(ca_cert) if ca_cert else None)
    raise bad


# --------------------------------------------------------------------------- shared helpers


def checked_artifact(artifact_dir: Path) -> Artifact:
    """The artifact's manifest, after checking its files against their hashes (before anything is sent)."""
    from .backends.base import read_manifest, verify_files

    artifact = read_manifest(artifact_dir)
    bad = verify_files(artifact, artifact_dir)
    if bad:
        raise EdgeoptError(f"artifact {artifact_dir} is damaged: {', '.join(bad)} missing or changed since it was built")
    return artifact


def artifact_files(artifact: Artifact) -> list[str]:
    from .backends.base import MANIFEST

    return [MANIFEST, *sorted(artifact.files)]


def _run(cmd: list[str], what: str, *, check: bool = True) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_timeout(), stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise EdgeoptError(f"{what}: {cmd[0]} not found") from None
    except subprocess.TimeoutExpired:
        raise EdgeoptError(f"{what}: no answer in {_timeout():g} s ($EDGEOPT_REMOTE_TIMEOUT)") from None
    if check and proc.returncode != 0:
        raise EdgeoptError(f"{what} failed (exit {proc.returncode}): {_last_line(proc)}")
    return proc


def _last_line(proc: subprocess.CompletedProcess) -> str:
    for text in (proc.stderr, proc.stdout):
        lines = [ln.strip() for ln in (text or "").replace("\r", "").splitlines() if ln.strip()]
        if lines:
            return lines[-1]
    return "no output"


def profile_command(artifact_dir: str, threads: int | None, warmup: int, repeats: int) -> list[str]:
    """Arguments (after the Python executable) that profile an artifact on the machine they run on, JSON out."""
    args = ["-m", "edgeopt.cli", "profile", artifact_dir, "--device", "local", "--json", "--no-save",
            "--warmup", str(warmup), "--repeats", str(repeats)]
    if threads:
        args += ["--threads", str(threads)]
    return args


def parse_profile_output(text: str, spec: str) -> Profile:
    """The Profile a remote ``edgeopt profile --json`` printed (anything before the JSON is ignored)."""
    from pydantic import ValidationError

    text = text.replace("\r", "")
    start = text.find("{")
    try:
        if start < 0:
            raise ValueError("no JSON")
        profile = Profile.model_validate_json(text[start:].strip())
    except (ValueError, ValidationError):
        tail = text.strip().splitlines()[-1] if text.strip() else "nothing"
        raise EdgeoptError(f"{spec} did not return a profile (got: {tail[:200]})") from None
    return profile.model_copy(update={"device": spec})


# --------------------------------------------------------------------------- ssh


@dataclass
class SshDevice(Device):
    host: str
    user: str | None = None
    port: int | None = None

    @property
    def spec(self) -> str:  # type: ignore[override]
        return "ssh://" + (f"{self.user}@" if self.user else "") + self.host + (f":{self.port}" if self.port else "")

    def _dest(self, for_scp: bool = False) -> str:
        host = f"[{self.host}]" if for_scp and ":" in self.host else self.host
        return f"{self.user}@{host}" if self.user else host

    def _options(self) -> list[str]:
        return ["-o", "BatchMode=yes", *shlex.split(os.environ.get("EDGEOPT_SSH_OPTIONS", ""))]

    def ssh_command(self, remote_command: str) -> list[str]:
        port = ["-p", str(self.port)] if self.port else []
        return [os.environ.get("EDGEOPT_SSH", "ssh"), *port, *self._options(), self._dest(), remote_command]

    def scp_command(self, local: Path, remote: str) -> list[str]:
        port = ["-P", str(self.port)] if self.port else []
        return [os.environ.get("EDGEOPT_SCP", "scp"), "-q", "-r", *port, *self._options(), str(local),
                f"{self._dest(for_scp=True)}:{remote}"]

    def profile(self, artifact_dir: Path, *, threads: int | None = None, warmup: int = 10, repeats: int = 100) -> Profile:
        checked_artifact(artifact_dir)
        python = os.environ.get("EDGEOPT_REMOTE_PYTHON", "python3")
        made = _run(self.ssh_command('mktemp -d "${TMPDIR:-/tmp}/edgeopt.XXXXXX"'), f"{self.spec}: making a temp dir")
        tmp = made.stdout.strip().splitlines()[-1] if made.stdout.strip() else ""
        if not tmp.startswith("/"):
            raise EdgeoptError(f"{self.spec}: mktemp printed {tmp!r}, not a directory")
        try:
            remote_art = f"{tmp}/artifact"
            _run(self.scp_command(Path(artifact_dir), remote_art), f"{self.spec}: copying the artifact")
            cmd = f"cd {shlex.quote(tmp)} && {python} " + shlex.join(profile_command(remote_art, threads, warmup, repeats))
            proc = _run(self.ssh_command(cmd), f"{self.spec}: profiling", check=False)
            if proc.returncode != 0:
                raise EdgeoptError(f"{self.spec}: remote 'edgeopt profile' failed (exit {proc.returncode}): {_last_line(proc)} "
                                   f"(edgeopt and the artifact's runtime must be installed there; $EDGEOPT_REMOTE_PYTHON "
                                   f"picks the Python)")
            return parse_profile_output(proc.stdout, self.spec)
        finally:
            _run(self.ssh_command(f"rm -rf {shlex.quote(tmp)}"), f"{self.spec}: cleaning up", check=False)


# --------------------------------------------------------------------------- adb


@dataclass
class BenchmarkResult:
    """What TFLite's ``benchmark_model`` printed, in ms/bytes."""

    latency_ms: dict[str, float] = field(default_factory=dict)
    peak_memory_bytes: int | None = None
    ops: list[OpTiming] = field(default_factory=list)
    runs: int = 0


_NUM = r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"


def parse_benchmark_model(text: str) -> BenchmarkResult:
    """Parse ``benchmark_model`` output: the timed runs' ``count=... avg=...`` line (the last before
    ``Inference timings in us``), its memory line and, with ``--enable_op_profiling``, the per-op run-order table."""
    lines = text.replace("\r", "").splitlines()
    end = next((i for i, ln in enumerate(lines) if "Inference timings in us:" in ln), None)
    if end is None:
        raise EdgeoptError("benchmark_model printed no 'Inference timings in us' line: "
                           + (lines[-1].strip()[:200] if lines else "no output"))
    res = BenchmarkResult()
    stats: dict[str, float] = {}
    for ln in lines[:end]:
        if "count=" in ln and "Timings (microseconds)" not in ln and re.search(r"\bavg=", ln):
            stats = {k: float(v) for k, v in re.findall(rf"\b(\w+)={_NUM}", ln)}
    m = re.search(rf"Inference \(avg\): {_NUM}", lines[end])
    if not stats and m:
        stats = {"avg": float(m.group(1))}
    if not stats:
        raise EdgeoptError("benchmark_model printed no timing statistics")
    res.runs = int(stats.get("count", 0))
    for key, ours in (("median", "p50"), ("avg", "mean"), ("min", "min"), ("max", "max"), ("p5", "p5"), ("p95", "p95"),
                      ("std", "std")):
        if key in stats:
            res.latency_ms[ours] = stats[key] / 1e3
    for ln in lines[end:]:
        m = re.search(rf"Overall peak memory footprint \(MB\) via periodic monitoring: {_NUM}", ln)
        if m:
            res.peak_memory_bytes = int(float(m.group(1)) * 2**20)
            break
        m = re.search(rf"(?:Peak memory footprint|Memory footprint delta from the start of the tool) \(MB\): init={_NUM} overall={_NUM}", ln)
        if m and res.peak_memory_bytes is None:
            res.peak_memory_bytes = int(float(m.group(2)) * 2**20)
    res.ops = _benchmark_ops(lines)
    return res


def _benchmark_ops(lines: list[str]) -> list[OpTiming]:
    """The run-order table of 'Operator-wise Profiling Info for Regular Benchmark Runs'."""
    start = next((i for i, ln in enumerate(lines) if "Operator-wise Profiling Info for Regular Benchmark Runs" in ln), None)
    if start is None:
        return []
    ops: list[tuple[str, str, float]] = []
    header_seen = False
    for ln in lines[start + 1:]:
        if "[node type]" in ln:
            header_seen = True
            continue
        if not header_seen:
            continue
        if not ln.strip() or ln.lstrip().startswith("="):
            break
        cols = [c.strip() for c in ln.split("\t") if c.strip()]
        if len(cols) < 9:
            cols = ln.split()
        try:
            kind, avg_ms, name = cols[0], float(cols[3]), " ".join(cols[8:])
        except (IndexError, ValueError):
            continue
        name = re.sub(r":\d+$", "", name).strip("[]") or kind
        ops.append((name, kind, avg_ms * 1e3))
    whole = sum(o[2] for o in ops) or 1.0
    return sorted((OpTiming(name=n, op_type=k, mean_us=us, share=us / whole) for n, k, us in ops), key=lambda o: -o.mean_us)


def _getprops(text: str) -> dict[str, str]:
    return dict(re.findall(r"^\[([^\]]+)\]: \[([^\]]*)\]", text.replace("\r", ""), re.M))


@dataclass
class AdbDevice(Device):
    serial: str

    @property
    def spec(self) -> str:  # type: ignore[override]
        return f"adb:{self.serial}"

    def _exe(self) -> str:
        exe = os.environ.get("ADB") or shutil.which("adb")
        if not exe:
            raise EdgeoptError("adb not found: install Android platform-tools and put adb on PATH, or set $ADB")
        return exe

    def adb(self, *args: str, what: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run([self._exe(), "-s", self.serial, *args], f"{self.spec}: {what}", check=check)

    def shell(self, command: str, what: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.adb("shell", command, what=what, check=check)

    def push(self, artifact_dir: Path, artifact: Artifact, remote: str) -> None:
        files = artifact_files(artifact)
        dirs = sorted({remote, *(f"{remote}/{Path(f).parent.as_posix()}" for f in files if "/" in f)})
        self.shell(f"rm -rf {shlex.quote(remote)} && mkdir -p " + " ".join(map(shlex.quote, dirs)), "making the remote dir")
        for f in files:
            self.adb("push", str(Path(artifact_dir) / f), f"{remote}/{f}", what=f"pushing {f}")

    def host(self, unit: str, runtime: str) -> dict[str, str]:
        props = _getprops(self.shell("getprop", "reading device properties", check=False).stdout)
        return {"hostname": self.serial, "system": f"Android {props.get('ro.build.version.release', '?')}",
                "machine": props.get("ro.product.cpu.abi", "?"),
                "cpu": props.get("ro.soc.model") or props.get("ro.board.platform") or props.get("ro.hardware", "?"),
                "model": f"{props.get('ro.product.manufacturer', '')} {props.get('ro.product.model', '?')}".strip(),
                "runtime": runtime, "unit": unit}

    def profile(self, artifact_dir: Path, *, threads: int | None = None, warmup: int = 10, repeats: int = 100) -> Profile:
        from .backends.base import MANIFEST, sha256_of

        artifact = checked_artifact(artifact_dir)
        sha = sha256_of(Path(artifact_dir) / MANIFEST)
        remote = f"{ADB_ROOT}/{sha[:12]}"
        self.push(Path(artifact_dir), artifact, remote)
        try:
            bench = os.environ.get("EDGEOPT_ADB_BENCHMARK", ADB_BENCHMARK)
            if artifact.backend in ("tflite", "tflm"):
                probe = self.shell(f"test -x {shlex.quote(bench)} && echo present || echo absent", "looking for benchmark_model",
                                   check=False)
                if "present" in probe.stdout:
                    return self._benchmark_model(Path(artifact_dir), artifact, sha, remote, bench, threads, warmup, repeats)
            python = os.environ.get("EDGEOPT_ADB_PYTHON", "python3")
            cmd = f"cd {shlex.quote(ADB_ROOT)} && {python} " + shlex.join(profile_command(remote, threads, warmup, repeats))
            proc = self.shell(cmd, "profiling", check=False)
            if proc.returncode != 0 or "{" not in proc.stdout:
                hint = (f"no benchmark_model at {bench} ($EDGEOPT_ADB_BENCHMARK) and " if artifact.backend in ("tflite", "tflm")
                        else "")
                raise EdgeoptError(f"{self.spec}: {hint}'{python} -m edgeopt.cli profile' failed on the device: "
                                   f"{_last_line(proc)} (install edgeopt there, e.g. in Termux, or set $EDGEOPT_ADB_PYTHON)")
            return parse_profile_output(proc.stdout, self.spec)
        finally:
            self.shell(f"rm -rf {shlex.quote(remote)}", "cleaning up", check=False)

    def _benchmark_model(self, artifact_dir: Path, artifact: Artifact, sha: str, remote: str, bench: str,
                         threads: int | None, warmup: int, repeats: int) -> Profile:
        from .backends.tflite import RECORD
        from .profiling import _now_utc

        rec_path = artifact_dir / (RECORD if artifact.backend == "tflite" else "tflm.json")
        record = json.loads(rec_path.read_text()) if rec_path.is_file() else {}
        n = int(threads or record.get("threads") or 0)
        args = [bench, f"--graph={remote}/{artifact.primary}", f"--warmup_runs={warmup}", "--warmup_min_secs=0",
                f"--num_runs={repeats}", "--min_secs=0", "--enable_op_profiling=true"]
        if n:
            args.append(f"--num_threads={n}")
        delegate = record.get("delegate")
        if delegate in ("nnapi", "gpu", "xnnpack"):
            args.append(f"--use_{delegate}=true")
        proc = self.shell(shlex.join(args), "running benchmark_model", check=False)
        if proc.returncode != 0 and "Inference timings in us" not in proc.stdout:
            raise EdgeoptError(f"{self.spec}: benchmark_model failed (exit {proc.returncode}): {_last_line(proc)}")
        res = parse_benchmark_model(proc.stdout + "\n" + proc.stderr)
        return Profile(artifact_sha256=sha, target=artifact.target, backend=artifact.backend, unit=artifact.plan.unit, device=self.spec,
                       host=self.host(artifact.plan.unit, "benchmark_model"), threads=n, warmup=warmup,
                       repeats=res.runs or repeats, latency_ms=res.latency_ms, peak_memory_bytes=res.peak_memory_bytes,
                       ops=res.ops, predicted_latency_ms=artifact.predicted_latency_ms,
                       # an Android device stands for a phone target; anything else reached over adb is not its class
                       on_target_class=artifact.plan.target_definition.device_class == "mobile", created_utc=_now_utc())


# --------------------------------------------------------------------------- edgeopt agent (http)


def pack_artifact(artifact_dir: Path, artifact: Artifact) -> bytes:
    """The artifact's manifest and files as a tar.gz (names relative to the artifact directory)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for f in artifact_files(artifact):
            tar.add(Path(artifact_dir) / f, arcname=f, recursive=False)
    return buf.getvalue()


@dataclass
class AgentDevice(Device):
    url: str
    token: str = field(repr=False)
    #: PEM file of the CA (or self-signed certificate) an https:// agent's certificate is checked against; None:
    #: $EDGEOPT_AGENT_CA, else the system's trusted CAs
    ca_cert: str | None = None

    @property
    def spec(self) -> str:  # type: ignore[override]
        return self.url

    def _ssl_context(self):
        import ssl

        ca = self.ca_cert or os.environ.get("EDGEOPT_AGENT_CA") or None
        try:
            return ssl.create_default_context(cafile=ca)
        except (OSError, ssl.SSLError) as e:
            raise EdgeoptError(f"cannot read the agent's CA certificate {ca} ($EDGEOPT_AGENT_CA): "
                               f"{getattr(e, 'strerror', None) or e}") from None

    def _open(self, req):
        import urllib.request

        handlers = [urllib.request.ProxyHandler({})]
        if self.url.startswith("https://"):
            handlers.append(urllib.request.HTTPSHandler(context=self._ssl_context()))
        opener = urllib.request.build_opener(*handlers)
        return opener.open(req, timeout=_timeout())

    def request(self, path: str, body: bytes | None = None, query: dict | None = None) -> dict:
        import urllib.error
        import urllib.request
        from urllib.parse import urlencode

        url = f"{self.url}{path}" + (f"?{urlencode(query)}" if query else "")
        if any(not 33 <= ord(c) <= 126 for c in self.token):
            raise EdgeoptError("the agent's token must be printable ASCII without spaces (nothing is stripped)")
        headers = {"Authorization": f"Bearer {self.token}"}
        if body is not None:
            headers["Content-Type"] = "application/gzip"
        req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET", headers=headers)
        try:
            with self._open(req) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            if e.code == 401:
                raise EdgeoptError(f"the agent at {self.url} rejected the token (HTTP 401)") from None
            try:
                msg = json.loads(e.read()).get("error", e.reason)
            except (ValueError, AttributeError, OSError):
                msg = e.reason
            raise EdgeoptError(f"the agent at {self.url} answered HTTP {e.code}: {msg}") from None
        except (urllib.error.URLError, OSError) as e:
            import ssl

            reason = getattr(e, "reason", e)
            hint = (" (give the agent's CA or self-signed certificate in $EDGEOPT_AGENT_CA)"
                    if isinstance(reason, ssl.SSLCertVerificationError) else "")
            raise EdgeoptError(f"cannot reach the agent at {self.url}: {reason}{hint}") from None
        except ValueError:
            raise EdgeoptError(f"the agent at {self.url} did not answer JSON") from None

    def profile(self, artifact_dir: Path, *, threads: int | None = None, warmup: int = 10, repeats: int = 100) -> Profile:
        from pydantic import ValidationError

        artifact = checked_artifact(artifact_dir)
        query = {"warmup": warmup, "repeats": repeats, **({"threads": threads} if threads else {})}
        data = self.request("/profile", pack_artifact(Path(artifact_dir), artifact), query)
        try:
            profile = Profile.model_validate(data)
        except ValidationError:
            raise EdgeoptError(f"the agent at {self.url} did not return a profile") from None
        return profile.model_copy(update={"device": self.spec})


def profile_artifact(artifact_dir: str | Path, device="local", threads: int | None = None, warmup: int = 10,
                     repeats: int = 100, inputs=None, *, token: str | None = None, op_repeats: int = 20) -> Profile:
    """Measure an artifact on ``device``: warm-up runs, then ``repeats`` timed runs with ``threads`` threads.

    ``device`` is ``local`` (this machine, in the artifact's runtime), ``ssh://[user@]host[:port]``,
    ``adb:SERIAL`` or ``http://host:port`` (an ``edgeopt agent``; ``token`` or $EDGEOPT_AGENT_TOKEN), or a
    :class:`edgeopt.remote.Device`.  ``inputs`` (local only): a mapping or .npz/.npy path; default random data
    in the plan's input shapes.  The profile is returned, not saved: see :func:`save_profile`.
    """
    from .profiling import _check_counts, profile_local

    dev = device if isinstance(device, Device) else parse_device(str(device), token=token)
    if isinstance(dev, LocalDevice):
        return profile_local(artifact_dir, threads=threads, warmup=warmup, repeats=repeats, inputs=inputs,
                             op_repeats=op_repeats)
    if inputs is not None:
        raise EdgeoptError(f"given inputs are supported on the local device only, not {dev.spec}")
    _check_counts(threads, warmup, repeats)
    return dev.profile(Path(artifact_dir), threads=threads, warmup=warmup, repeats=repeats)
