"""``edgeopt agent``: a small HTTP(S) service on a device that profiles artifacts sent to it.

Endpoints (stdlib :mod:`http.server`):

* ``GET /health``: ``{"status": "ok", "edgeopt": version}`` (no token needed, nothing else disclosed);
* ``POST /profile?warmup=N&repeats=N&threads=N``: the body is the artifact directory as a
  tar.gz (manifest.json at its top), with ``Authorization: Bearer TOKEN``.  Answers the
  :class:`~edgeopt.types.Profile` JSON measured here (``--device local``).

Every answer is JSON (``{"error": ...}`` for a refusal, never a traceback).

What a token holder can do: make the agent load the uploaded model in the artifact's runtime on this machine and
time it.  What it cannot do: run code of its own (nothing from the upload is executed: a TensorRT engine is built
by edgeopt's builder from a checked build.json, OpenVINO properties come from an allow-list), read or write files
outside the request's temporary directory (archive members and manifest paths must be relative paths that stay
inside it; links, devices and ``..`` are refused), or exhaust the machine (bounded upload, unpacked size and
member count, checked while the archive streams; per-connection timeouts and a minimum upload rate; a fixed pool
of connection workers, 503 when it is full; profiles run one at a time).

The token is compared in constant time (401 otherwise, before the body is read); it must be at least
:data:`MIN_TOKEN_LENGTH` printable characters.  TLS: ``tls_cert``/``tls_key`` (``--tls-cert``/``--tls-key``)
serve HTTPS; otherwise keep it on a trusted network.  It listens on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import bz2
import errno
import gzip
import hmac
import io
import json
import lzma
import re
import socket
import ssl
import sys
import tarfile
import tempfile
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, urlsplit

from .errors import EdgeoptError

DEFAULT_PORT = 8765
DEFAULT_MAX_UPLOAD = 256 * 2**20
#: Unpacked bytes allowed per uploaded byte limit (a tar.gz of a model compresses little; bounds gzip bombs).
UNPACK_FACTOR = 4
MAX_MEMBERS = 10_000
#: Bytes tarfile may read for one member's headers (pax / GNU long names are read into memory).
MAX_HEADER_BYTES = 1 << 20
LIMITS = {"warmup": (0, 100_000), "repeats": (1, 1_000_000), "threads": (1, 1024)}
MIN_TOKEN_LENGTH = 16
#: Seconds a connection may take for one request's line and headers (and a keep-alive connection may idle), and
#: the longest wait for one read or write.
DEFAULT_TIMEOUT = 30.0
#: Connections served at once; more wait up to QUEUE_WAIT s for a free worker, then get 503.
DEFAULT_WORKERS = 16
QUEUE_WAIT = 5.0
#: An upload must keep up this average rate (bytes/s) after its first DEFAULT_TIMEOUT s (408 otherwise).
MIN_BODY_RATE = 64 * 1024
REQUEST_QUEUE_SIZE = 128


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def check_token(token: str | None) -> str:
    """The token, if it is usable: at least :data:`MIN_TOKEN_LENGTH` printable ASCII characters, no whitespace
    (nothing is stripped).  Raises a one-line :class:`EdgeoptError` naming the requirement otherwise."""
    hint = "e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))'"
    if not token:
        raise EdgeoptError("the agent needs a token: --token or $EDGEOPT_AGENT_TOKEN")
    if not token.strip():
        raise EdgeoptError(f"the agent's token is only whitespace; give at least {MIN_TOKEN_LENGTH} printable "
                           f"characters ({hint})")
    if any(not 33 <= ord(c) <= 126 for c in token):
        raise EdgeoptError("the agent's token must be printable ASCII without spaces or control characters "
                           f"(nothing is stripped); {hint}")
    if len(token) < MIN_TOKEN_LENGTH:
        raise EdgeoptError(f"the agent's token must be at least {MIN_TOKEN_LENGTH} characters (got {len(token)}); {hint}")
    return token


# --------------------------------------------------------------------------- unpacking uploads


class _Budget:
    """A file's ``read`` that refuses (413) past ``total`` bytes, and past ``phase`` bytes while it is set."""

    def __init__(self, f, total: int):
        self.f, self.left, self.phase = f, total, None

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n if n is not None and n >= 0 else 1 << 16)
        self.left -= len(data)
        if self.left < 0:
            raise BadRequest(413, "the archive decompresses to more data than its members may hold")
        if self.phase is not None:
            self.phase -= len(data)
            if self.phase < 0:
                raise BadRequest(400, f"an archive member's headers are over {MAX_HEADER_BYTES:,} bytes")
        return data


def _decompressed(raw):
    """The archive's tar stream: gzip, bzip2 and xz are decompressed as it is read (never all at once)."""
    head = raw.read(6)
    raw.seek(0)
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if head[:3] == b"BZh":
        return bz2.BZ2File(raw)
    if head == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(raw)
    return raw


_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError, ValueError)


def _unpack_error(e: BaseException) -> BadRequest:
    return BadRequest(400, f"the body is not a valid tar(.gz) archive: {type(e).__name__}: {str(e)[:200]}")


def safe_extract(data, dest: Path, *, max_bytes: int, max_members: int | None = None) -> None:
    """Unpack a tar (optionally gzip/bzip2/xz compressed) into ``dest`` while streaming it.

    ``data`` is the archive's bytes, a path, or a seekable binary file.  Each member is checked before it is
    written: only regular files and directories under relative paths inside ``dest`` (absolute, ``..``, links,
    devices, sparse files: 400; ``tarfile.data_filter`` as well), at most ``max_members`` members (default
    :data:`MAX_MEMBERS`: 400 as soon as one more header is read) and ``max_bytes`` declared bytes in all (413
    before the member that crosses it is written).  The decompressed bytes read are bounded too (a member's
    headers to :data:`MAX_HEADER_BYTES`, the whole stream to ``max_bytes`` plus header room).  On a refusal
    ``dest`` may hold what was unpacked before it: the caller removes it.
    """
    max_members = MAX_MEMBERS if max_members is None else max_members
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = io.BytesIO(bytes(data))
    elif isinstance(data, (str, Path)):
        raw = open(data, "rb")  # noqa: SIM115 - closed below
    else:
        raw = data
    root = Path(dest).resolve()
    budget = None
    try:
        budget = _Budget(_decompressed(raw), max_bytes + (max_members + 16) * 3 * 512 + MAX_HEADER_BYTES)
        budget.phase = MAX_HEADER_BYTES
        try:
            tar = tarfile.open(fileobj=budget, mode="r|")
        except _READ_ERRORS as e:
            raise _unpack_error(e) from None
        with tar:
            _extract_members(tar, budget, root, max_bytes, max_members)
    finally:
        if budget is not None and budget.f is not raw:
            budget.f.close()
        if raw is not data:
            raw.close()


def _extract_members(tar: tarfile.TarFile, budget: _Budget, root: Path, max_bytes: int, max_members: int) -> None:
    count = total = 0
    while True:
        budget.phase = MAX_HEADER_BYTES
        try:
            m = tar.next()
        except _READ_ERRORS as e:
            raise _unpack_error(e) from None
        budget.phase = None
        if m is None:
            return
        count += 1
        if count > max_members:
            raise BadRequest(400, f"the archive has more than {max_members:,} members")
        name = m.name
        p = PurePosixPath(name)
        if (not name or p.is_absolute() or ".." in p.parts or "\\" in name or ":" in (p.parts[0] if p.parts else "")
                or any(ord(c) < 32 for c in name)):
            raise BadRequest(400, f"unsafe path in archive: {name[:200]!r}")
        if not (m.isfile() or m.isdir()) or m.issparse():
            raise BadRequest(400, f"archive member {name[:200]!r} is not a regular file or directory")
        target = root / p
        if not target.resolve().is_relative_to(root):
            raise BadRequest(400, f"unsafe path in archive: {name[:200]!r}")
        if hasattr(tarfile, "data_filter"):
            try:
                tarfile.data_filter(m, str(root))
            except tarfile.FilterError as e:
                raise BadRequest(400, f"unsafe archive member {name[:200]!r}: {e}") from None
        total += max(m.size, 0)
        if total > max_bytes:
            raise BadRequest(413, f"the archive unpacks to more than {max_bytes:,} bytes")
        try:
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            out = open(target, "wb")  # noqa: SIM115 - closed below
        except OSError as e:
            raise _write_error(name, e) from None
        with out:
            try:
                src = tar.extractfile(m)
            except _READ_ERRORS as e:
                raise _unpack_error(e) from None
            while True:
                try:
                    block = src.read(1 << 20)
                except _READ_ERRORS as e:
                    raise _unpack_error(e) from None
                if not block:
                    break
                try:
                    out.write(block)
                except OSError as e:
                    raise _write_error(name, e) from None


def _write_error(name: str, e: OSError) -> BadRequest:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return BadRequest(507, "the agent has no disk space left for this upload")
    return BadRequest(400, f"cannot unpack {name[:200]!r}: {e.strerror or e}")


def find_artifact_root(folder: Path) -> Path:
    from .backends.base import MANIFEST

    if (folder / MANIFEST).is_file():
        return folder
    subs = [p for p in folder.iterdir() if p.is_dir()]
    if len(subs) == 1 and (subs[0] / MANIFEST).is_file():
        return subs[0]
    raise BadRequest(400, f"the archive holds no {MANIFEST} at its top (or in its single top folder)")


def _params(query: str) -> dict[str, int]:
    try:
        pairs = parse_qs(query, keep_blank_values=True, max_num_fields=4 * len(LIMITS))
    except ValueError:
        raise BadRequest(400, f"too many query parameters; valid: {', '.join(LIMITS)}") from None
    out = {}
    for k, v in pairs.items():
        if k not in LIMITS:
            raise BadRequest(400, f"unknown parameter {k[:100]!r}; valid: {', '.join(LIMITS)}")
        lo, hi = LIMITS[k]
        if not re.fullmatch(r"[0-9]{1,9}", v[-1]):
            raise BadRequest(400, f"{k} must be an integer, not {v[-1][:50]!r}")
        n = int(v[-1])
        if not lo <= n <= hi:
            raise BadRequest(400, f"{k} must be between {lo} and {hi}")
        out[k] = n
    return out


# --------------------------------------------------------------------------- the server


def tls_context(cert: str | Path, key: str | Path) -> ssl.SSLContext:
    """A TLS server context (TLS 1.2 or later) with the certificate chain and key; one-line error otherwise."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as e:
        raise EdgeoptError(f"cannot load the TLS certificate {cert} and key {key}: {getattr(e, 'strerror', None) or e}") from None
    return ctx


class AgentServer(ThreadingHTTPServer):
    """The agent: a threading HTTP server whose connections run on at most ``max_workers`` threads (a connection
    that finds them all busy waits up to ``queue_wait`` s, then gets 503), each with ``timeout`` s per request's
    headers and per read/write, a minimum upload rate, and optionally TLS."""

    daemon_threads = True
    request_queue_size = REQUEST_QUEUE_SIZE

    def __init__(self, address, token: str, *, max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
                 profiles_dir: Path | None = None, quiet: bool = False, timeout: float = DEFAULT_TIMEOUT,
                 max_workers: int = DEFAULT_WORKERS, queue_wait: float = QUEUE_WAIT, min_body_rate: int = MIN_BODY_RATE,
                 max_members: int | None = None, tls_cert: str | Path | None = None, tls_key: str | Path | None = None):
        self.token = check_token(token).encode()
        if not timeout > 0:
            raise EdgeoptError(f"the agent's timeout must be positive (got {timeout})")
        if int(max_workers) < 1:
            raise EdgeoptError(f"the agent needs at least 1 worker (got {max_workers})")
        if int(max_upload_bytes) < 1:
            raise EdgeoptError("the agent's upload limit must be positive")
        if (tls_cert is None) != (tls_key is None):
            raise EdgeoptError("--tls-cert and --tls-key go together: give both, or neither for plain HTTP")
        self.ssl_context = tls_context(tls_cert, tls_key) if tls_cert is not None else None
        self.max_upload_bytes = int(max_upload_bytes)
        self.profiles_dir = profiles_dir
        self.quiet = quiet
        self.conn_timeout = float(timeout)
        self.max_workers = int(max_workers)
        self.queue_wait = float(queue_wait)
        self.min_body_rate = max(1, int(min_body_rate))
        self.max_members = max_members
        self.lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(self.max_workers)
        super().__init__(address, AgentHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.ssl_context else 'http'}://{host}:{port}"

    def log(self, line: str) -> None:
        if not self.quiet:
            sys.stderr.write(line[:500] + "\n")

    def process_request(self, request, client_address) -> None:
        """Serve the connection on a worker thread when one of ``max_workers`` is free; else 503."""
        if not self.slots.acquire(timeout=self.queue_wait):
            self.log(f"agent {client_address[0]} refused: all {self.max_workers} workers busy")
            self._refuse_busy(request)
            self._close(request, linger=0.05)
            return
        try:
            threading.Thread(target=self._serve_connection, args=(request, client_address), daemon=True,
                             name=f"edgeopt-agent-{self.server_address[1]}-connection").start()
        except RuntimeError:  # no thread could be started
            self.slots.release()
            self._refuse_busy(request)
            self._close(request, linger=0.05)

    def _refuse_busy(self, request) -> None:
        if self.ssl_context is not None:
            return  # no TLS handshake on the accepting thread: just close
        body = json.dumps({"error": f"the agent is busy ({self.max_workers} connections); retry later"}).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Retry-After: 1\r\nConnection: close\r\n\r\n").encode()
        try:
            request.settimeout(0.5)
            request.sendall(head + body)
        except OSError:
            pass

    def shutdown_request(self, request) -> None:
        self._close(request, linger=1.0)

    def _close(self, request, linger: float) -> None:
        """Half-close, then read what the client still sends (up to 1 MiB for ``linger`` s) before closing: closing
        a socket with unread input resets the connection, and the client could lose the answer."""
        try:
            request.shutdown(socket.SHUT_WR)
            deadline, left = time.monotonic() + linger, 1 << 20
            while left > 0 and (wait := deadline - time.monotonic()) > 0:
                request.settimeout(wait)
                chunk = request.recv(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass
        self.close_request(request)

    def _serve_connection(self, request, client_address) -> None:
        conn = request
        try:
            request.settimeout(self.conn_timeout)
            if self.ssl_context is not None:
                conn = self.ssl_context.wrap_socket(request, server_side=True)  # the handshake: bounded by the timeout
            self.finish_request(conn, client_address)
        except (OSError, ssl.SSLError) as e:
            self.log(f"agent {client_address[0]} connection ended: {type(e).__name__}: {e}")
        except Exception:  # noqa: BLE001 - a bug in a handler: one line, keep serving
            self.handle_error(conn, client_address)
        finally:
            self.shutdown_request(conn)
            self.slots.release()

    def handle_error(self, request, client_address) -> None:
        e = sys.exc_info()[1]
        self.log(f"agent {client_address[0]} internal error: {type(e).__name__}: {e}")


class _DeadlineReader(io.RawIOBase):
    """The connection's input, each read bounded by the handler's ``deadline`` (and its ``timeout``)."""

    def __init__(self, handler: AgentHandler):
        self.h = handler

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        left = self.h.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive in time")
        self.h.connection.settimeout(min(left, self.h.timeout))
        return self.h.connection.recv_into(b)


def _one_line(text: str, limit: int = 500) -> str:
    return " ".join(str(text).split())[:limit]


class AgentHandler(BaseHTTPRequestHandler):
    server: AgentServer
    server_version = "edgeopt-agent"
    protocol_version = "HTTP/1.1"

    def version_string(self) -> str:
        return self.server_version  # no Python version disclosed

    def setup(self) -> None:
        self.timeout = self.server.conn_timeout
        self.deadline = time.monotonic() + self.timeout
        self._body_started = False
        super().setup()
        self.rfile.close()
        self.rfile = io.BufferedReader(_DeadlineReader(self), 1 << 16)

    def handle_one_request(self) -> None:
        self.deadline = time.monotonic() + self.timeout  # the request line and headers (or a keep-alive idle)
        self._body_started = False
        super().handle_one_request()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        self.server.log(f"agent {self.address_string()} {format % args}")

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (bad request line, headers too long or too many, unknown method), as JSON."""
        if code == 501:
            code, message = 405, f"method {str(self.command)[:20]!r} is not allowed; use GET /health or POST /profile"
        self.close_connection = True
        self._send(code, {"error": _one_line(message or self.responses.get(code, ("error",))[0], 300)})

    def _send(self, status: int, payload: dict | str, headers: dict[str, str] | None = None) -> None:
        if self.request_version in ("", "HTTP/0.9"):  # http.server would send no status line
            self.request_version = "HTTP/1.0"
        body = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
        self.connection.settimeout(self.timeout)  # reads may have left a shorter one
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _discard_body(self, limit: int = 1 << 20) -> None:
        """Read a small refused body, so the client sees the answer instead of a reset connection."""
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            return
        if 0 < n <= limit and not self._body_started:
            self._body_started = True
            self.deadline = time.monotonic() + self.timeout
            try:
                self.rfile.read(n)
            except OSError:
                pass

    def _authorized(self) -> bool:
        values = self.headers.get_all("Authorization") or []
        if len(values) != 1:
            return False
        scheme, sep, given = values[0].partition(" ")
        return (sep == " " and scheme.lower() == "bearer"
                and hmac.compare_digest(given.encode("utf-8", "replace"), self.server.token))

    def handle_expect_100(self) -> bool:
        if self.command == "POST" and not self._authorized():
            self.close_connection = True
            self._send(401, {"error": "missing or invalid token"}, {"WWW-Authenticate": 'Bearer realm="edgeopt"'})
            return False
        return super().handle_expect_100()

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        from . import __version__

        if "Content-Length" in self.headers or "Transfer-Encoding" in self.headers:
            self.close_connection = True  # a GET body would be read as the next request
        path = urlsplit(self.path).path
        if path == "/health":
            self._send(200, {"status": "ok", "edgeopt": __version__})
        else:
            self._send(404, {"error": f"no such endpoint {path[:100]!r}; try GET /health or POST /profile"})

    def _content_length(self) -> int:
        if "Transfer-Encoding" in self.headers:
            raise BadRequest(411, "Transfer-Encoding is not supported: send the body with a Content-Length")
        values = self.headers.get_all("Content-Length") or []
        if not values:
            raise BadRequest(411, "Content-Length is required")
        given = {v.strip() for v in values}
        if len(given) != 1 or not re.fullmatch(r"[0-9]{1,15}", next(iter(given))):
            raise BadRequest(400, "bad Content-Length")
        n = int(next(iter(given)))
        if n > self.server.max_upload_bytes:
            raise BadRequest(413, f"upload of {n:,} bytes is over the agent's limit of {self.server.max_upload_bytes:,}")
        return n

    def do_POST(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        self.close_connection = True  # a refused body is never read: do not reuse the connection
        if url.path != "/profile":
            self._discard_body()
            self._send(404, {"error": f"no such endpoint {url.path[:100]!r}; POST /profile"})
            return
        if not self._authorized():
            self._discard_body()
            self._send(401, {"error": "missing or invalid token"}, {"WWW-Authenticate": 'Bearer realm="edgeopt"'})
            return
        folder = None
        try:
            params = _params(url.query)
            n = self._content_length()
            with tempfile.TemporaryDirectory(prefix="edgeopt-agent-") as d:
                folder = d
                upload = Path(d) / "upload"
                self._read_body(n, upload)
                profile = self._profile(upload, Path(d) / "artifact", params)
        except Exception as e:  # noqa: BLE001 - answer, keep serving
            self._discard_body()  # unless the body was (partly) read already
            if isinstance(e, BadRequest):
                status, message = e.status, str(e)
            elif isinstance(e, EdgeoptError):
                status, message = 422, str(e)
            elif isinstance(e, _ArtifactFailed):
                status, message = 422, str(e)
            else:
                status, message = 500, f"internal error: {type(e).__name__}: {e}"
                self.server.log(f"agent {self.address_string()} {message}")
            if folder:
                message = message.replace(str(Path(folder).resolve()), "<upload>").replace(folder, "<upload>")
            self._send(status, {"error": _one_line(message)})
            return
        self._send(200, profile.model_dump_json())

    def _read_body(self, n: int, path: Path) -> None:
        """Copy the body to ``path``; it must keep up ``min_body_rate`` after the first ``timeout`` s (408)."""
        start, got, rate = time.monotonic(), 0, self.server.min_body_rate
        self._body_started = True
        with open(path, "wb") as f:
            while got < n:
                self.deadline = start + self.timeout + got / rate
                try:
                    chunk = self.rfile.read(min(1 << 16, n - got))
                except TimeoutError:
                    raise BadRequest(408, f"the body arrived too slowly (at least {rate:,} bytes/s after the first "
                                          f"{self.timeout:g} s)") from None
                except OSError as e:
                    raise BadRequest(400, f"the connection failed while reading the body: {e}") from None
                if not chunk:
                    raise BadRequest(400, f"the body ended early ({got:,} of {n:,} bytes)")
                try:
                    f.write(chunk)
                except OSError as e:
                    raise _write_error("the upload", e) from None
                got += len(chunk)

    def _profile(self, upload: Path, dest: Path, params: dict[str, int]):
        from .profiling import profile_local, save_profile

        dest.mkdir()
        safe_extract(upload, dest, max_bytes=self.server.max_upload_bytes * UNPACK_FACTOR,
                     max_members=self.server.max_members)
        upload.unlink()
        root = find_artifact_root(dest)
        with self.server.lock:
            try:
                profile = profile_local(root, threads=params.get("threads"), warmup=params.get("warmup", 10),
                                        repeats=params.get("repeats", 100))
            except (BadRequest, EdgeoptError):
                raise
            except Exception as e:  # noqa: BLE001 - the uploaded model failed in its runtime
                raise _ArtifactFailed(f"the artifact failed in its runtime: {type(e).__name__}: "
                                      f"{_one_line(str(e), 300)}") from None
        if self.server.profiles_dir is not None:
            save_profile(profile, self.server.profiles_dir)
        return profile


class _ArtifactFailed(Exception):
    """The runtime raised on the uploaded artifact (a client's problem: 422)."""


def make_server(host: str = "127.0.0.1", port: int = DEFAULT_PORT, token: str = "", **kw) -> AgentServer:
    """A bound (not yet serving) agent; ``port=0`` picks a free port (see ``.url``).  Keywords: see
    :class:`AgentServer` (max_upload_bytes, profiles_dir, quiet, timeout, max_workers, queue_wait, min_body_rate,
    max_members, tls_cert, tls_key)."""
    try:
        return AgentServer((host, port), token, **kw)
    except OSError as e:
        raise EdgeoptError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def serve(host: str, port: int, token: str, **kw) -> None:
    server = make_server(host, port, token, **kw)
    print(f"edgeopt agent listening on {server.url}", flush=True)
    if server.ssl_context is None and host not in ("127.0.0.1", "localhost", "::1"):
        print("edgeopt agent: plain HTTP on a network address: the token and uploads are not encrypted "
              "(--tls-cert/--tls-key serve HTTPS)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()

