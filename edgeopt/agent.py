"""``edgeopt agent``: a small HTTP service on a device that profiles artifacts sent to it.

Endpoints (stdlib :class:`http.server.ThreadingHTTPServer`):

* ``GET /health``: ``{"status": "ok", "edgeopt": version}`` (no token needed, nothing else disclosed);
* ``POST /profile?warmup=N&repeats=N&threads=N``: the body is the artifact directory as a
  tar.gz (manifest.json at its top), with ``Authorization: Bearer TOKEN``.  Answers the
  :class:`~edgeopt.types.Profile` JSON measured here (``--device local``).

Safety: every request but /health needs the token (compared in constant time; 401
otherwise, before the body is read); bodies over the size limit get 413; the archive may
hold only regular files and directories under relative paths without ``..`` (anything
else: 400, nothing extracted), and its unpacked size is bounded too; it is unpacked into
a fresh temporary directory that is removed afterwards.  Profiles run one at a time, so
measurements do not disturb each other.  Plain HTTP: put it on a trusted network or
behind a TLS proxy; it listens on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import hmac
import io
import json
import shutil
import sys
import tarfile
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, urlsplit

from .errors import EdgeoptError

DEFAULT_PORT = 8765
DEFAULT_MAX_UPLOAD = 256 * 2**20
#: Unpacked bytes allowed per uploaded byte limit (a tar.gz of a model compresses little; bounds gzip bombs).
UNPACK_FACTOR = 4
MAX_MEMBERS = 10_000
LIMITS = {"warmup": (0, 100_000), "repeats": (1, 1_000_000), "threads": (1, 1024)}


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def safe_extract(data: bytes, dest: Path, *, max_bytes: int) -> None:
    """Unpack a tar(.gz) into ``dest``, refusing the whole archive if any member is not a regular file or
    directory under a relative path inside ``dest`` (absolute, ``..``, links, devices), or it unpacks too big."""
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
        members = tar.getmembers()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise BadRequest(400, f"the body is not a tar(.gz) archive: {e}") from None
    if len(members) > MAX_MEMBERS:
        raise BadRequest(400, f"the archive has {len(members)} members (at most {MAX_MEMBERS})")
    root = dest.resolve()
    total = 0
    for m in members:
        p = PurePosixPath(m.name)
        if not m.name or p.is_absolute() or ".." in p.parts or "\\" in m.name or ":" in (p.parts[0] if p.parts else ""):
            raise BadRequest(400, f"unsafe path in archive: {m.name!r}")
        if not (m.isfile() or m.isdir()):
            raise BadRequest(400, f"archive member {m.name!r} is not a regular file or directory")
        if not (root / p).resolve().is_relative_to(root):
            raise BadRequest(400, f"unsafe path in archive: {m.name!r}")
        total += max(m.size, 0)
        if total > max_bytes:
            raise BadRequest(413, f"the archive unpacks to more than {max_bytes:,} bytes")
    with tar:
        for m in members:
            target = root / PurePosixPath(m.name)
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            if src is None:  # pragma: no cover - isfile() members always have data
                raise BadRequest(400, f"cannot read {m.name!r}")
            with src, open(target, "wb") as f:
                shutil.copyfileobj(src, f)


def find_artifact_root(folder: Path) -> Path:
    from .backends.base import MANIFEST

    if (folder / MANIFEST).is_file():
        return folder
    subs = [p for p in folder.iterdir() if p.is_dir()]
    if len(subs) == 1 and (subs[0] / MANIFEST).is_file():
        return subs[0]
    raise BadRequest(400, f"the archive holds no {MANIFEST} at its top (or in its single top folder)")


def _params(query: str) -> dict[str, int]:
    out = {}
    for k, v in parse_qs(query, keep_blank_values=True).items():
        if k not in LIMITS:
            raise BadRequest(400, f"unknown parameter '{k}'; valid: {', '.join(LIMITS)}")
        lo, hi = LIMITS[k]
        try:
            n = int(v[-1])
        except ValueError:
            raise BadRequest(400, f"{k} must be an integer, not {v[-1]!r}") from None
        if not lo <= n <= hi:
            raise BadRequest(400, f"{k} must be between {lo} and {hi}")
        out[k] = n
    return out


class AgentServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, token: str, *, max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
                 profiles_dir: Path | None = None, quiet: bool = False):
        if not token:
            raise EdgeoptError("the agent needs a token: --token or $EDGEOPT_AGENT_TOKEN")
        self.token = token.encode()
        self.max_upload_bytes = int(max_upload_bytes)
        self.profiles_dir = profiles_dir
        self.quiet = quiet
        self.lock = threading.Lock()
        super().__init__(address, AgentHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class AgentHandler(BaseHTTPRequestHandler):
    server: AgentServer
    server_version = "edgeopt-agent"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        if not self.server.quiet:
            sys.stderr.write(f"agent {self.address_string()} {format % args}\n")

    def _send(self, status: int, payload: dict | str, headers: dict[str, str] | None = None) -> None:
        body = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _discard_body(self, limit: int = 1 << 20) -> None:
        """Read a small refused body, so the client sees the answer instead of a reset connection."""
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            return
        if 0 < n <= limit:
            self.rfile.read(n)

    def _authorized(self) -> bool:
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.server.token)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        from . import __version__

        if urlsplit(self.path).path == "/health":
            self._send(200, {"status": "ok", "edgeopt": __version__})
        else:
            self._send(404, {"error": f"no such endpoint {urlsplit(self.path).path}; try GET /health or POST /profile"})

    def do_POST(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        self.close_connection = True  # a refused body is never read: do not reuse the connection
        if url.path != "/profile":
            self._send(404, {"error": f"no such endpoint {url.path}; POST /profile"})
            return
        if not self._authorized():
            self._discard_body()
            self._send(401, {"error": "missing or invalid token"}, {"WWW-Authenticate": 'Bearer realm="edgeopt"'})
            return
        data = None
        try:
            params = _params(url.query)
            length = self.headers.get("Content-Length")
            if length is None:
                raise BadRequest(411, "Content-Length is required")
            try:
                n = int(length)
            except ValueError:
                raise BadRequest(400, "bad Content-Length") from None
            if n < 0:
                raise BadRequest(400, "bad Content-Length")
            if n > self.server.max_upload_bytes:
                raise BadRequest(413, f"upload of {n:,} bytes is over the agent's limit of {self.server.max_upload_bytes:,}")
            data = self.rfile.read(n)
            if len(data) != n:
                raise BadRequest(400, "the body ended early")
            profile = self._profile(data, params)
        except Exception as e:  # noqa: BLE001 - answer, keep serving
            if data is None:
                self._discard_body()
            if isinstance(e, BadRequest):
                self._send(e.status, {"error": str(e)})
            elif isinstance(e, EdgeoptError):
                self._send(422, {"error": str(e)})
            else:
                self._send(500, {"error": f"internal error: {type(e).__name__}: {e}"})
            return
        self._send(200, profile.model_dump_json())

    def _profile(self, data: bytes, params: dict[str, int]):
        from .profiling import profile_local, save_profile

        with tempfile.TemporaryDirectory(prefix="edgeopt-agent-") as d:
            safe_extract(data, Path(d), max_bytes=self.server.max_upload_bytes * UNPACK_FACTOR)
            root = find_artifact_root(Path(d))
            with self.server.lock:
                profile = profile_local(root, threads=params.get("threads"), warmup=params.get("warmup", 10),
                                        repeats=params.get("repeats", 100))
        if self.server.profiles_dir is not None:
            save_profile(profile, self.server.profiles_dir)
        return profile


def make_server(host: str = "127.0.0.1", port: int = DEFAULT_PORT, token: str = "", **kw) -> AgentServer:
    """A bound (not yet serving) agent; ``port=0`` picks a free port (see ``.url``)."""
    try:
        return AgentServer((host, port), token, **kw)
    except OSError as e:
        raise EdgeoptError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def serve(host: str, port: int, token: str, **kw) -> None:
    server = make_server(host, port, token, **kw)
    print(f"edgeopt agent listening on {server.url}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
