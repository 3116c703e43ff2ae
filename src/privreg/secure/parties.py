"""The processes of a private registration: party 1 (moving), party 2 (fixed) and, for MPC, the dealer.

Connections (each TLS 1.3 with mutual certificates, roles checked on the certificate):
party 1 -> party 2, and for MPC party 1 -> dealer and party 2 -> dealer. Party 1 drives: it sends
the public setup (configuration, protocol), then one ``level`` message per pyramid level and one
``cross`` message per seam call (FHE: plus ``encrypt`` when it needs [[V]] for new rows), and
``close`` at the end, when the others send their statistics and exit. Any failure is sent as an
``error`` message (best effort) and ends the process with a clear message.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable

import numpy as np
import torch

from ..errors import InputError, PrivregError
from ..fhe.ckks import (CkksParams, Evaluator, KeyOwner, Layout, flooding, pack_bytes, uniform_masks, unpack_bytes,
                        v2_split)
from ..image import Image, read_image
from ..joint import FeatureSpec, FixedSide
from ..mpc.product import LIMBS, encode_features, feature_columns, int_cross
from ..mpc.ring import Prg, new_key
from ..net.channel import Channel, Listener, PeerError, Traffic, connect
from ..net.pki import tls_context
from ..register import RegistrationResult, register_with_backend
from .fhe_backend import FHEBackend
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
    with contextlib.suppress(Exception):  # best effort: the peer may be gone already
        ch.send("error", {"message": str(exc)})


# ----------------------------------------------------------------------------- party 2
PROTOCOLS = ("mpc", "fhe-v1", "fhe-v2")


def _fhe_version(protocol: str) -> int:
    return 2 if protocol == "fhe-v2" else 1


def run_fixed_party(fixed: Image, listen: str, dealer: str | None, pki: str, timeout: float = 120.0,
                    recorder: list | None = None) -> dict:
    """Serve party 1's requests with the fixed image; returns this party's statistics.

    The protocol is party 1's choice (setup message); ``dealer`` is needed for ``mpc`` only."""
    clock = _Clock()
    ctx_server, ctx_client = tls_context(pki, "fixed", True), tls_context(pki, "fixed", False)
    listener = Listener(listen, ctx_server, timeout)
    _announce(listener)
    moving: Channel | None = None
    to_dealer: Channel | None = None
    try:
        moving = listener.accept(("moving",), recorder=recorder)
        listener.close()
        moving.send("hello", {"grid": grid_to_dict(fixed.grid)})
        _, meta, _ = moving.recv("setup")
        cfg = config_from_dict(meta["config"])
        protocol = meta.get("protocol", "mpc")
        if protocol not in PROTOCOLS:
            raise PeerError(f"unknown protocol {protocol!r} requested by party 1")
        session = PublicSession(cfg, fixed.grid)
        side = FixedSide(fixed, session.levels, bool(cfg.normalize))
        if protocol == "mpc":
            if not dealer:
                raise InputError("the MPC protocol needs the dealer's address (--dealer HOST:PORT)")
            to_dealer = connect(dealer, ctx_client, "dealer", timeout)
            extra = _serve_mpc(moving, to_dealer, side, session)
        else:
            extra = _serve_fhe(moving, side, session, CkksParams.from_dict(meta["ckks"]), _fhe_version(protocol))
        stats = {**clock.report(), "traffic_moving": _traffic(moving.traffic), **extra}
        if to_dealer is not None:
            stats["traffic_dealer"] = _traffic(to_dealer.traffic)
        moving.send("stats", stats)
        return stats
    except BaseException as exc:
        _send_error(moving, exc)
        raise
    finally:
        listener.close()
        if moving is not None:
            moving.close()
        if to_dealer is not None:
            to_dealer.close()


def _serve_mpc(moving: Channel, to_dealer: Channel, side: FixedSide, session: PublicSession) -> dict:
    """Answer ``level`` and ``cross`` messages with the secret-sharing protocol until ``close``."""
    key = new_key()
    to_dealer.send("key", {}, key=torch.frombuffer(bytearray(key), dtype=torch.uint8))
    prg = Prg(key)
    v_int = bins = None
    level = -1
    while True:
        kind, meta, arr = moving.recv(("level", "cross", "close"))
        if kind == "close":
            return {"prg_labels": prg.labels_used}
        if kind == "level":
            level = int(meta["level"])
            spec = FeatureSpec(meta["kind"], int(meta["bins"]))
            v = side.features(level, spec)
            one_hot = spec.kind == "mi"
            v_int, v_bits, v_range, v_limbs = encode_features(v, one_hot)
            bins = v.argmax(1) if one_hot else None
            rb = prg.ring(f"Rb/{level}", tuple(v_int.shape))
            moving.send("features", {"v_range": v_range, "v_limbs": v_limbs}, vh=v_int - rb, v_bits=v_bits)
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


def _serve_fhe(moving: Channel, side: FixedSide, session: PublicSession, params: CkksParams, version: int) -> dict:
    """Hold the CKKS secret key: send the public context, encrypt features, decrypt masked results.

    FHE-v2 also evaluates the second half of every call on party 1's encrypted weights (party 1's
    public context only) and masks that half before party 1 decrypts it."""
    owner = KeyOwner(params)
    moving.send("context", {}, context=torch.frombuffer(bytearray(owner.public_context()), dtype=torch.uint8))
    peer = None
    if version == 2:
        _, _, arr = moving.recv("context")
        peer = Evaluator(arr["context"].numpy().tobytes(), params)  # refuses a context with a secret key
    prg = Prg(new_key())
    v = known = None
    level, decrypted = -1, 0
    try:
        while True:
            kind, meta, arr = moving.recv(("level", "encrypt", "cross", "close"))
            if kind == "close":
                return {"ciphertexts_decrypted": decrypted}
            if kind == "level":
                level = int(meta["level"])
                v = side.features(level, FeatureSpec(meta["kind"], int(meta["bins"])))
                moving.send("level-ready", {"points": int(v.shape[0])})
            elif kind == "encrypt":
                if v is None or int(meta["level"]) != level:
                    raise PeerError("encryption requested for a level that was not started")
                index = session.index(level, meta, {})  # URS: from the public seed; never GMS indices
                known = (v if index is None else v[index]).numpy()
                n1 = int(meta.get("rows", known.shape[0])) if version == 2 else known.shape[0]
                if not 0 < n1 <= known.shape[0]:
                    raise PeerError("invalid row count requested")
                blobs, exps = owner.encrypt_features(known, n1)
                moving.send("features", {"points": n1, "cols": int(known.shape[1])},
                            exps=torch.from_numpy(exps), **pack_bytes(blobs))
            else:
                if known is None:
                    raise PeerError("product requested before the features were encrypted")
                blobs = unpack_bytes(arr, 4096)
                vals = owner.decrypt_masked(blobs, int(meta["count"]))
                decrypted += len(blobs)
                if peer is None:
                    moving.send("reply", {"call": meta["call"]}, values=torch.from_numpy(vals))
                    continue
                moving.send("reply", {"call": meta["call"]}, **_second_half(peer, prg, known, exps, vals, meta, arr))
    finally:
        owner.seal.close()
        if peer is not None:
            peer.seal.close()


def _second_half(peer: Evaluator, prg: Prg, known: np.ndarray, exps: np.ndarray, vals: np.ndarray, meta: dict,
                 arr: dict) -> dict:
    """FHE-v2, party 2: y_1 + M - R from party 1's masked half and [[y_2 + R + noise]] for its own half."""
    k, call = int(meta["outputs"]), int(meta["call"])
    b = known.shape[1]
    n1 = v2_split(known.shape[0])
    bb = Layout(n1, b, peer.seal.slots).bb
    if not 0 < k or vals.size < k * bb:
        raise PeerError("invalid output count requested")
    y1 = vals.reshape(-1, bb)[:k, :b]
    r = uniform_masks(prg, f"R/{call}", (b, peer.seal.slots), peer.params.mask_bits)
    noisy = r + flooding(r.shape, peer.params.flood_bits)  # blurs the CKKS error of party 2's products
    enc = peer.replicated_products(unpack_bytes(arr, 4096, "w2"), k, known[n1:] / 2.0 ** exps, noisy)
    return {"values": torch.from_numpy(y1 - r[:, :k].T), **pack_bytes(enc, "y2")}


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
                b = feature_columns(meta["kind"], int(meta["bins"]))
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
def run_moving_party(moving: Image, fixed_address: str, dealer_address: str | None, pki: str, cfg,
                     timeout: float = 120.0, reveal_gms_indices: bool = False,
                     progress: Callable[[str], None] | None = None,
                     recorder: list | None = None, protocol: str = "mpc",
                     ckks: CkksParams | None = None) -> tuple[RegistrationResult, object]:
    """Register ``moving`` to party 2's fixed image; returns the result and the fixed grid.

    ``protocol`` is ``"mpc"`` (needs the dealer), ``"fhe-v1"`` or ``"fhe-v2"`` (CKKS, no dealer)."""
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown protocol {protocol!r} (choose from {', '.join(PROTOCOLS)})")
    check_secure_config(cfg, reveal_gms_indices, protocol)
    if protocol == "mpc" and not dealer_address:
        raise InputError("the MPC protocol needs the dealer's address")
    ckks = ckks or CkksParams()
    clock = _Clock()
    ctx = tls_context(pki, "moving", False)
    to_dealer = connect(dealer_address, ctx, "dealer", timeout) if protocol == "mpc" else None
    to_fixed: Channel | None = None
    backend = None
    try:
        to_fixed = connect(fixed_address, ctx, "fixed", timeout, recorder=recorder)
        if to_dealer is not None:
            key = new_key()
            to_dealer.send("key", {}, key=torch.frombuffer(bytearray(key), dtype=torch.uint8))
        _, hello, _ = to_fixed.recv("hello")
        fixed_grid = grid_from_dict(hello["grid"])
        if fixed_grid.ndim != moving.ndim:
            raise InputError(f"fixed image is {fixed_grid.ndim}D but moving image is {moving.ndim}D")
        setup = {"config": config_to_dict(cfg), "grid": hello["grid"], "protocol": protocol, "ckks": ckks.to_dict()}
        to_fixed.send("setup", setup)
        if to_dealer is not None:
            to_dealer.send("setup", setup)
            backend = MPCBackend(to_fixed, to_dealer, key, cfg.sampling.mode, reveal_gms_indices)
        else:
            backend = FHEBackend(to_fixed, ckks, cfg.sampling.mode, _fhe_version(protocol))
        result = register_with_backend(moving, fixed_grid, backend, cfg, progress=progress)
        to_fixed.send("close")
        _, fixed_stats, _ = to_fixed.recv("stats")
        dealer_stats = None
        if to_dealer is not None:
            to_dealer.send("close")
            _, dealer_stats, _ = to_dealer.recv("stats")
        result.report["secure"] = _report(protocol, backend, clock, fixed_stats, dealer_stats, to_fixed, to_dealer)
        return result, fixed_grid
    except BaseException as exc:
        _send_error(to_fixed, exc)
        _send_error(to_dealer, exc)
        raise
    finally:
        if isinstance(backend, FHEBackend):
            backend.close()
        if to_fixed is not None:
            to_fixed.close()
        if to_dealer is not None:
            to_dealer.close()


def _report(protocol: str, backend, clock: _Clock, fixed_stats: dict, dealer_stats: dict | None, to_fixed: Channel,
            to_dealer: Channel | None) -> dict:
    calls = max(backend.stats.calls, 1)
    tf = to_fixed.traffic
    online_p1 = tf.by_tag.get("sent:cross", 0)
    online_p2 = tf.by_tag.get("received:reply", 0)
    per_level_p2 = tf.by_tag.get("received:features", 0) + tf.by_tag.get("received:context", 0)
    moving = {**clock.report(), "traffic_fixed": _traffic(tf),
              "online_bytes_sent_per_call": online_p1 / calls, "online_bytes_received_per_call": online_p2 / calls}
    summary = {
        "online_MB_per_iteration": (online_p1 + online_p2) / calls / 1e6,
        "features_MB_per_run": per_level_p2 / 1e6,
        "moving_seconds_per_iteration": backend.stats.seconds / calls,
    }
    out = {"protocol": protocol, "calls": backend.stats.calls, "moving": moving, "fixed": dict(fixed_stats),
           "summary": summary, "per_call": backend.per_call}
    if to_dealer is not None:
        moving["traffic_dealer"] = _traffic(to_dealer.traffic)
        out["dealer"] = dict(dealer_stats or {})
        summary["dealer_offline_MB_per_iteration"] = fixed_stats["traffic_dealer"]["wire_bytes_received"] / calls / 1e6
    else:
        summary["public_context_MB"] = tf.by_tag.get("received:context", 0) / 1e6
        summary["own_public_context_MB"] = tf.by_tag.get("sent:context", 0) / 1e6  # FHE-v2: party 1's key
    return out


def party_main(role: str, image_path: str | None, listen: str | None, dealer: str | None, pki: str,
               timeout: float) -> int:
    """Entry point of ``privreg party fixed`` and ``privreg dealer`` (party 1 runs via the CLI)."""
    try:
        if role == "dealer":
            run_dealer(listen or "127.0.0.1:0", pki, timeout)
        elif role == "fixed":
            if not image_path:
                raise InputError("the fixed party needs the FIXED image")
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
