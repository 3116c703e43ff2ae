"""A TLS 1.3 channel with mutual certificate authentication that counts every byte on the wire.

TLS runs over an ``ssl.MemoryBIO`` pair, so this module does the socket I/O itself and counts the
bytes of every TLS record sent and received (handshake included): the numbers in the reports are
what a network would carry. Messages are frames

    b"PRV1" | header length (u32) | body length (u64) | JSON header | body (raw array bytes)

with arrays described in the header (name, dtype, shape); nothing is unpickled. Frames larger than
``max_frame`` bytes, unknown dtypes, size mismatches, a silent or vanished peer all raise
:class:`PeerError` with a clear message; sockets time out after ``timeout`` seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import ssl
import struct
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import PrivregError

MAGIC = b"PRV1"
PREFIX = struct.Struct("!4sIQ")
DTYPES = {"int64": np.int64, "float64": np.float64, "int32": np.int32, "float32": np.float32, "uint8": np.uint8}
MAX_HEADER = 1 << 20


class PeerError(PrivregError):
    """The other party failed: disconnected, timed out, misbehaved or could not be authenticated."""


@dataclass
class Traffic:
    """Wire bytes (TLS records) and application payload bytes, per direction."""

    sent: int = 0
    received: int = 0
    payload_sent: int = 0
    payload_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    seconds_waiting: float = 0.0
    by_tag: dict = field(default_factory=dict)

    def add_tag(self, tag: str, wire: int) -> None:
        self.by_tag[tag] = self.by_tag.get(tag, 0) + wire


class Channel:
    """One authenticated connection to a peer with a known role."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, server: bool, peer_role: str | tuple[str, ...],
                 timeout: float = 120.0, max_frame: int = 1 << 31, recorder: list | None = None) -> None:
        allowed = (peer_role,) if isinstance(peer_role, str) else tuple(peer_role)
        self.sock = sock
        self.peer_role = " or ".join(allowed)
        self.timeout = timeout
        self.max_frame = max_frame
        self.traffic = Traffic()
        self.recorder = recorder  # if a list: every sent/received message (header, arrays) is appended
        sock.settimeout(timeout)
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = ctx.wrap_bio(self._in, self._out, server_side=server)
        try:
            self._io(self._tls.do_handshake)
        except ssl.SSLError as exc:
            self.close()
            raise PeerError(f"TLS handshake with {self.peer_role} failed: {exc.reason or exc}") from None
        cert = self._tls.getpeercert()
        cn = dict(x[0] for x in cert.get("subject", ())).get("commonName") if cert else None
        if cn not in allowed:
            self.close()
            raise PeerError(f"peer certificate names {cn!r}, expected {self.peer_role}")
        self.peer_role = cn
        der = self._tls.getpeercert(binary_form=True) or b""
        self.peer_fingerprint = hashlib.sha256(der).hexdigest()  # the peer's certificate (ledger key)

    # ------------------------------------------------------------------ transport
    def _flush(self) -> None:
        data = self._out.read()
        if data:
            try:
                self.sock.sendall(data)
            except socket.timeout:
                raise PeerError(f"{self.peer_role} stopped reading (timeout {self.timeout:.0f} s)") from None
            except OSError as exc:
                raise PeerError(f"connection to {self.peer_role} lost: {exc}") from None
            self.traffic.sent += len(data)

    def _fill(self) -> None:
        t0 = time.perf_counter()
        try:
            data = self.sock.recv(1 << 20)
        except socket.timeout:
            raise PeerError(f"{self.peer_role} did not answer within {self.timeout:.0f} s") from None
        except OSError as exc:
            raise PeerError(f"connection to {self.peer_role} lost: {exc}") from None
        finally:
            self.traffic.seconds_waiting += time.perf_counter() - t0
        if not data:
            raise PeerError(f"{self.peer_role} closed the connection")
        self.traffic.received += len(data)
        self._in.write(data)

    def _io(self, op, *args):
        while True:
            try:
                result = op(*args)
                self._flush()
                return result
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self._tls.read(min(n - len(buf), 1 << 24))
            except ssl.SSLWantReadError:
                self._fill()
                continue
            except ssl.SSLError as exc:
                raise PeerError(f"TLS error from {self.peer_role}: {exc}") from None
            if not chunk:
                raise PeerError(f"{self.peer_role} closed the connection")
            buf += chunk
        return bytes(buf)

    # ------------------------------------------------------------------- messages
    def send(self, kind: str, meta: dict | None = None, **arrays: torch.Tensor | np.ndarray) -> int:
        """Send one message; returns the wire bytes it took."""
        before = self.traffic.sent
        head = {"kind": kind, "meta": meta or {}, "arrays": []}
        bodies = []
        for name, arr in arrays.items():
            a = arr.detach().cpu().numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)
            a = np.ascontiguousarray(a)
            if a.dtype.name not in DTYPES:
                raise TypeError(f"cannot send dtype {a.dtype}")
            head["arrays"].append({"name": name, "dtype": a.dtype.name, "shape": list(a.shape)})
            bodies.append(a.tobytes())
        hbytes = json.dumps(head).encode()
        body_len = sum(len(b) for b in bodies)
        self._io(self._tls.write, PREFIX.pack(MAGIC, len(hbytes), body_len) + hbytes)
        for b in bodies:
            for s in range(0, len(b), 1 << 26):
                self._io(self._tls.write, b[s:s + (1 << 26)])
        self.traffic.payload_sent += PREFIX.size + len(hbytes) + body_len
        self.traffic.messages_sent += 1
        wire = self.traffic.sent - before
        self.traffic.add_tag("sent:" + kind, wire)
        if self.recorder is not None:
            self.recorder.append(("sent", kind, head["meta"], {k: _np(v) for k, v in arrays.items()}))
        return wire

    def recv(self, expect: str | tuple[str, ...] | None = None) -> tuple[str, dict, dict[str, torch.Tensor]]:
        """Receive one message (kind, meta, arrays); ``expect`` checks its kind."""
        before = self.traffic.received
        magic, hlen, blen = PREFIX.unpack(self._recv_exact(PREFIX.size))
        if magic != MAGIC:
            raise PeerError(f"malformed frame from {self.peer_role} (bad magic)")
        if hlen > MAX_HEADER or blen > self.max_frame:
            raise PeerError(f"oversized frame from {self.peer_role} ({hlen} + {blen} bytes, limit {self.max_frame})")
        try:
            head = json.loads(self._recv_exact(hlen))
            kind, meta, specs = head["kind"], head["meta"], head["arrays"]
            if not isinstance(kind, str) or not isinstance(meta, dict) or not isinstance(specs, list):
                raise TypeError("kind, meta or arrays of the wrong type")
            for s in specs:
                if (not isinstance(s["name"], str) or not isinstance(s["shape"], list) or len(s["shape"]) > 8
                        or not all(type(x) is int and 0 <= x < 1 << 40 for x in s["shape"])):
                    raise TypeError(f"invalid array description {str(s)[:80]}")
            sizes = [int(np.prod(s["shape"], dtype=np.int64)) * np.dtype(DTYPES[s["dtype"]]).itemsize for s in specs]
        except (ValueError, KeyError, TypeError) as exc:
            raise PeerError(f"malformed frame header from {self.peer_role}: {exc}") from None
        if sum(sizes) != blen:
            raise PeerError(f"malformed frame from {self.peer_role}: array sizes do not match the body")
        arrays = {}
        for s, n in zip(specs, sizes):
            raw = self._recv_exact(n)
            arrays[s["name"]] = torch.from_numpy(np.frombuffer(raw, dtype=DTYPES[s["dtype"]]).copy()).reshape(s["shape"])
        self.traffic.payload_received += PREFIX.size + hlen + blen
        self.traffic.messages_received += 1
        self.traffic.add_tag("received:" + kind, self.traffic.received - before)
        if kind == "error":
            raise PeerError(f"{self.peer_role} reported an error: {meta.get('message', '?')}")
        if expect is not None and kind not in ((expect,) if isinstance(expect, str) else expect):
            raise PeerError(f"unexpected message {kind!r} from {self.peer_role} (expected {expect})")
        if self.recorder is not None:
            self.recorder.append(("received", kind, meta, {k: v.numpy() for k, v in arrays.items()}))
        return kind, meta, arrays

    def close(self) -> None:
        with contextlib.suppress(Exception):  # best effort close_notify; the peer may be gone
            self._tls.unwrap()
            self._flush()
        with contextlib.suppress(OSError):
            self.sock.close()


def _np(v) -> np.ndarray:
    return v.detach().cpu().numpy().copy() if isinstance(v, torch.Tensor) else np.asarray(v).copy()


def parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise PrivregError(f"address must be HOST:PORT, got {text!r}")
    return host, int(port)


def connect(address: str, ctx: ssl.SSLContext, peer_role: str, timeout: float = 120.0, retry_seconds: float = 30.0,
            **kw) -> Channel:
    """Connect (retrying while the peer starts up) and authenticate ``peer_role``."""
    host, port = parse_address(address)
    deadline = time.monotonic() + retry_seconds
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
            break
        except OSError as exc:
            if time.monotonic() > deadline:
                raise PeerError(f"cannot reach {peer_role} at {address}: {exc}") from None
            time.sleep(0.1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return Channel(sock, ctx, server=False, peer_role=peer_role, timeout=timeout, **kw)


class Listener:
    """A listening socket that accepts authenticated peers by role."""

    def __init__(self, address: str, ctx: ssl.SSLContext, timeout: float = 120.0) -> None:
        host, port = parse_address(address)
        self.sock = socket.create_server((host, port))
        self.sock.settimeout(timeout)
        self.ctx, self.timeout = ctx, timeout

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def accept(self, roles: tuple[str, ...], wait: bool = False, **kw) -> Channel:
        """Accept one connection whose certificate names one of ``roles`` (``wait``: however long it
        takes; otherwise at most ``timeout`` seconds)."""
        while True:
            try:
                conn, _ = self.sock.accept()
                break
            except socket.timeout:
                if not wait:
                    raise PeerError(f"no {' or '.join(roles)} connected within {self.timeout:.0f} s") from None
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return Channel(conn, self.ctx, server=True, peer_role=roles, timeout=self.timeout, **kw)

    def close(self) -> None:
        self.sock.close()

