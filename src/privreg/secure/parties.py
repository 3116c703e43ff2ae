"""The three processes of a private registration: party 1 (moving), party 2 (fixed), the dealer.

Connections (each TLS 1.3 with mutual certificates, roles checked on the certificate):
party 1 -> party 2, party 1 -> dealer, party 2 -> dealer. Party 1 drives: it sends the public
setup, then one ``level`` message per pyramid level and one ``cross`` message per seam call,
and ``close`` at the end, when the others send their statistics and exit. Any failure is sent
as an ``error`` message (best effort) and ends the process with a clear message.
"""

from __future__ import annotations

import sys
import time
from typing import Callable

import torch

from ..errors import InputError, PrivregError
from ..image import Image, read_image
from ..joint import FeatureSpec, FixedSide
from ..mpc.product import LIMBS, encode_features, int_cross
from ..mpc.ring import Prg, new_key
from ..net.channel import Channel, Listener, PeerError, Traffic, connect
from ..net.pki import tls_context
from ..register import RegistrationResult, register_with_backend
from .mpc_backend import MPCBackend
from .session import PublicSession, check_secure_config, config_from_dict, config_to_dict, grid_from_dict, grid_to_dict


def _traffic(t: Traffic) -> dict:
    return {"wire_bytes_sent": t.sent, "wire_bytes_received": t.received, "payload_bytes_sent": t.payload_sent,
            "payload_bytes_received": t.payload_received, "messages_sent": t.messages_sent,
            "messages_received": t.messages_received, "seconds_waiting": t.seconds_waiting, "by_message": t.by_tag}


class _Clock:
    def __init__(self) -> None:
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def report(self) -> dict:
        return {"wall_seconds": time.perf_counter() - self.t0, "cpu_seconds": time.process_time() - self.c0}


def _announce(listener: Listener) -> None:
    """Tell a launcher which port we listen on (first line of stdout)."""
    print(f"LISTENING {listener.port}", flush=True)


def _send_error(ch: Channel | None, exc: BaseException) -> None:
    if ch is None:
        return
    try:
        ch.send("error", {"message": str(exc)})
    except Exception:  # noqa: BLE001 - the peer may be gone already
        pass


# ----------------------------------------------------------------------------- party 2
def run_fixed_party(fixed: Image, listen: str, dealer: str, pki: str, timeout: float = 120.0,
                    recorder: list | None = None) -> dict:
    """Serve party 1's requests with the fixed image; returns this party's statistics."""
    clock = _Clock()
    ctx_server, ctx_client = tls_context(pki, "fixed", True), tls_context(pki, "fixed", False)
    listener = Listener(listen, ctx_server, timeout)
    _announce(listener)
    to_dealer = connect(dealer, ctx_client, "dealer", timeout)
    moving: Channel | None = None
    try:
        moving = listener.accept(("moving",), recorder=recorder)
        listener.close()
        key = new_key()
        to_dealer.send("key", {}, key=torch.frombuffer(bytearray(key), dtype=torch.uint8))
        prg = Prg(key)
        moving.send("hello", {"grid": grid_to_dict(fixed.grid)})
        _, meta, _ = moving.recv("setup")
        cfg = config_from_dict(meta["config"])
        session = PublicSession(cfg, fixed.grid)
        side = FixedSide(fixed, session.levels, bool(cfg.normalize))
        v_int = bins = None
        level = -1
        while True:
            kind, meta, arr = moving.recv(("level", "cross", "close"))
            if kind == "close":
                stats = {**clock.report(), "traffic_moving": _traffic(moving.traffic),
                         "traffic_dealer": _traffic(to_dealer.traffic), "prg_labels": prg.labels_used}
                moving.send("stats", stats)
                return stats
            if kind == "level":
                level = int(meta["level"])
                spec = FeatureSpec(meta["kind"], int(meta["bins"]))
                v = side.features(level, spec)
                one_hot = spec.kind == "mi"
                v_int, v_bits, v_range = encode_features(v, one_hot)
                bins = v.argmax(1) if one_hot else None
                rb = prg.ring(f"Rb/{level}", tuple(v_int.shape))
                moving.send("features", {"v_range": v_range}, vh=v_int - rb, v_bits=v_bits)
                continue
            index, phi = session.call_basis(level, meta, arr)
            uh = arr["uh"]
            if uh.dtype != torch.int64 or uh.dim() != 2 or uh.shape[0] != phi.num_points:
                raise PeerError("malformed masked matrix from party 1")
            _, dm, darr = to_dealer.recv("t2")
            if int(dm["call"]) != int(meta["call"]):
                raise PeerError("dealer and party 1 disagree on the call number")
            rows = slice(None) if index is None else index
            z = int_cross(phi, uh, None if bins is not None else v_int[rows],
                          None if bins is None else bins[rows], v_int.shape[1])
            if tuple(darr["t2"].shape) != tuple(z.shape):
                raise PeerError("dealer's correlated randomness has the wrong shape")
            moving.send("reply", {"call": meta["call"]}, z=z + darr["t2"])
    except BaseException as exc:
        _send_error(moving, exc)
        raise
    finally:
        listener.close()
        if moving is not None:
            moving.close()
        to_dealer.close()


# ----------------------------------------------------------------------------- dealer
def run_dealer(listen: str, pki: str, timeout: float = 120.0) -> dict:
    """Provide the Phi-weighted triples of every seam call; sees no image-derived value."""
    clock = _Clock()
    listener = Listener(listen, tls_context(pki, "dealer", True), timeout)
    _announce(listener)
    chans: dict[str, Channel] = {}
    try:
        for _ in range(2):
            ch = listener.accept(("moving", "fixed"))
            if ch.peer_role in chans:
                raise PeerError(f"two connections claim the role {ch.peer_role}")
            chans[ch.peer_role] = ch
        listener.close()
        moving, fixed = chans["moving"], chans["fixed"]
        _, _, a1 = moving.recv("key")
        _, _, a2 = fixed.recv("key")
        prg1, prg2 = Prg(bytes(a1["key"].numpy())), Prg(bytes(a2["key"].numpy()))
        _, meta, _ = moving.recv("setup")
        session = PublicSession(config_from_dict(meta["config"]), grid_from_dict(meta["grid"]))
        rb = None
        level, last_call = -1, -1
        triples = 0
        while True:
            kind, meta, arr = moving.recv(("level", "cross", "close"))
            if kind == "close":
                stats = {**clock.report(), "triples": triples, "traffic_moving": _traffic(moving.traffic),
                         "traffic_fixed": _traffic(fixed.traffic)}
                moving.send("stats", stats)
                return stats
            if kind == "level":
                level = int(meta["level"])
                b = 2 if meta["kind"] == "ssd" else int(meta["bins"])
                rb = prg2.ring(f"Rb/{level}", (session.level_grid(level).numel, b))
                continue
            call = int(meta["call"])
            if call <= last_call:
                raise PeerError("call numbers must increase (a triple is never reused)")
            last_call = call
            index, phi = session.call_basis(level, meta, arr)
            a = int(meta["a"])
            ra = prg1.ring(f"Ra/{call}", (phi.num_points, a))
            t1 = prg1.ring(f"t1/{call}", (LIMBS, phi.num_basis, a, rb.shape[1]))
            t = int_cross(phi, ra, rb if index is None else rb[index])
            fixed.send("t2", {"call": call}, t2=t - t1)
            triples += 1
    except BaseException as exc:
        for ch in chans.values():
            _send_error(ch, exc)
        raise
    finally:
        listener.close()
        for ch in chans.values():
            ch.close()


# ----------------------------------------------------------------------------- party 1
def run_moving_party(moving: Image, fixed_address: str, dealer_address: str, pki: str, cfg,
                     timeout: float = 120.0, reveal_gms_indices: bool = False,
                     progress: Callable[[str], None] | None = None,
                     recorder: list | None = None) -> tuple[RegistrationResult, object]:
    """Register ``moving`` to party 2's fixed image; returns the result and the fixed grid."""
    check_secure_config(cfg, reveal_gms_indices)
    clock = _Clock()
    ctx = tls_context(pki, "moving", False)
    to_dealer = connect(dealer_address, ctx, "dealer", timeout)
    to_fixed: Channel | None = None
    try:
        to_fixed = connect(fixed_address, ctx, "fixed", timeout, recorder=recorder)
        key = new_key()
        to_dealer.send("key", {}, key=torch.frombuffer(bytearray(key), dtype=torch.uint8))
        _, hello, _ = to_fixed.recv("hello")
        fixed_grid = grid_from_dict(hello["grid"])
        if fixed_grid.ndim != moving.ndim:
            raise InputError(f"fixed image is {fixed_grid.ndim}D but moving image is {moving.ndim}D")
        setup = {"config": config_to_dict(cfg), "grid": hello["grid"]}
        to_fixed.send("setup", setup)
        to_dealer.send("setup", setup)
        backend = MPCBackend(to_fixed, to_dealer, key, cfg.sampling.mode, reveal_gms_indices)
        result = register_with_backend(moving, fixed_grid, backend, cfg, progress=progress)
        to_fixed.send("close")
        to_dealer.send("close")
        _, fixed_stats, _ = to_fixed.recv("stats")
        _, dealer_stats, _ = to_dealer.recv("stats")
        result.report["secure"] = _report(backend, clock, fixed_stats, dealer_stats, to_fixed, to_dealer)
        return result, fixed_grid
    except BaseException as exc:
        _send_error(to_fixed, exc)
        _send_error(to_dealer, exc)
        raise
    finally:
        if to_fixed is not None:
            to_fixed.close()
        to_dealer.close()


def _report(backend: MPCBackend, clock: _Clock, fixed_stats: dict, dealer_stats: dict, to_fixed: Channel,
            to_dealer: Channel) -> dict:
    calls = max(backend.stats.calls, 1)
    tf = to_fixed.traffic
    online_p1 = tf.by_tag.get("sent:cross", 0)
    online_p2 = tf.by_tag.get("received:reply", 0)
    per_level_p2 = tf.by_tag.get("received:features", 0)
    dealer_to_p2 = fixed_stats["traffic_dealer"]["wire_bytes_received"]
    return {
        "protocol": "mpc",
        "calls": backend.stats.calls,
        "moving": {**clock.report(), "traffic_fixed": _traffic(tf), "traffic_dealer": _traffic(to_dealer.traffic),
                   "online_bytes_sent_per_call": online_p1 / calls, "online_bytes_received_per_call": online_p2 / calls},
        "fixed": {k: v for k, v in fixed_stats.items()},
        "dealer": {k: v for k, v in dealer_stats.items()},
        "summary": {
            "online_MB_per_iteration": (online_p1 + online_p2) / calls / 1e6,
            "features_MB_per_run": per_level_p2 / 1e6,
            "dealer_offline_MB_per_iteration": dealer_to_p2 / calls / 1e6,
            "moving_seconds_per_iteration": backend.stats.seconds / calls,
        },
        "per_call": backend.per_call,
    }


def party_main(role: str, image_path: str | None, listen: str | None, dealer: str | None, pki: str,
               timeout: float) -> int:
    """Entry point of ``privreg party fixed`` and ``privreg dealer`` (party 1 runs via the CLI)."""
    try:
        if role == "dealer":
            run_dealer(listen or "127.0.0.1:0", pki, timeout)
        elif role == "fixed":
            if not image_path or not dealer:
                raise InputError("the fixed party needs FIXED image and --dealer HOST:PORT")
            img = read_image(image_path)
            img.check_finite("fixed image")
            run_fixed_party(img, listen or "127.0.0.1:0", dealer, pki, timeout)
        else:
            raise InputError(f"unknown role {role!r}")
        return 0
    except PrivregError as exc:
        print(f"privreg {role}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
