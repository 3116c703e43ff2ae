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
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..errors import InputError, PrivregError
from ..fhe.ckks import (CkksParams, Evaluator, KeyOwner, Layout, flooding, group_shape, pack_bytes, uniform_masks,
                        unpack_bytes, v2_split)
from ..image import Image, read_image
from ..joint import FeatureSpec, FixedSide
from ..mpc.product import LIMBS, encode_features, feature_columns, int_cross, opened_mask
from ..mpc.ring import Prg, new_key
from ..net.channel import Channel, Listener, PeerError, Traffic, connect
from ..net.pki import tls_context
from ..objectives import seam_need
from ..register import RegistrationConfig, RegistrationResult, register_with_backend
from .fhe_backend import MAX_V2_CIPHERTEXTS, FHEBackend, opened_slots, output_masks
from .ledger import Ledger, image_digest
from .mpc_backend import MPCBackend
from .plan import (DEFAULT_LIMIT_FRACTION, PROTOCOLS, Budget, BudgetExceeded, LevelBudget, PlanMismatch, check_limit,
                   level_budgets, plan_difference, public_plan)
from .protocol import Tag, leakage
from .session import PublicSession, check_secure_config, config_from_plan, grid_from_dict, grid_to_dict


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
        ch.send(Tag.ERROR, {"message": str(exc)})


# ----------------------------------------------------------------------------- party 2
def _fhe_version(protocol: str) -> int:
    return 2 if protocol == "fhe-v2" else 1


def _log(role: str, text: str) -> None:
    print(f"privreg {role}: {text}", file=sys.stderr, flush=True)


@dataclass
class FixedService:
    """Party 2: its image, its own plan (from its own command line) and what it allows.

    ``reveal_limit``: at most this fraction of the fixed image's voxels' worth of values may be
    opened to one peer over all its sessions (``ledger``)."""

    fixed: Image
    cfg: RegistrationConfig
    protocol: str
    dealer: str | None
    pki: str
    timeout: float = 120.0
    reveal_limit: float = DEFAULT_LIMIT_FRACTION
    ledger: Ledger = field(default_factory=lambda: Ledger(None))
    ckks: CkksParams = field(default_factory=CkksParams)
    recorder: list | None = None

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise InputError(f"unknown protocol {self.protocol!r} (choose from {', '.join(PROTOCOLS)})")
        if self.protocol == "mpc" and not self.dealer:
            raise InputError("the MPC protocol needs the dealer's address (--dealer HOST:PORT)")
        self.cfg.validate()
        check_secure_config(self.cfg, True, self.protocol)
        self.ckks.check()
        self.plan = public_plan(self.protocol, self.cfg, self.fixed.grid)
        self.levels = level_budgets(self.cfg, self.fixed.grid)
        self.image_id = image_digest(self.fixed)
        check_limit(sum(lev.values for lev in self.levels), self.fixed.grid.numel, self.reveal_limit)

    def serve_session(self, moving: Channel) -> dict:
        """One registration with an authenticated party 1; returns this party's statistics."""
        clock = _Clock()
        hello = {"grid": grid_to_dict(self.fixed.grid), "plan": self.plan}
        if self.protocol != "mpc":
            hello["ckks"] = self.ckks.to_dict()
        moving.max_frame = 1 << 20
        moving.send(Tag.HELLO, hello)
        _, meta, _ = moving.recv(Tag.SETUP)
        diff = plan_difference(self.plan, meta.get("plan"))
        if diff is not None:
            raise PlanMismatch(f"party 1's plan differs from this party's ({diff})")
        session_id = str(meta.get("session", ""))
        budget = Budget(self.levels, seam_need(self.cfg.metric, self.fixed.ndim, self.cfg.bins))
        total = budget.total_values
        before = self.ledger.reserve(self.image_id, moving.peer_fingerprint, total, self.fixed.grid.numel,
                                     self.reveal_limit)
        to_dealer: Channel | None = None
        moving.max_frame = frame_limit(self.levels, self.protocol)
        try:
            session = PublicSession(self.cfg, self.fixed.grid)
            side = FixedSide(self.fixed, session.levels, bool(self.cfg.normalize))
            if self.protocol == "mpc":
                to_dealer = connect(self.dealer, tls_context(self.pki, "fixed", False), "dealer", self.timeout)
                extra = _serve_mpc(moving, to_dealer, side, session, budget, session_id, self.plan)
            else:
                extra = _serve_fhe(moving, side, session, self.ckks, _fhe_version(self.protocol), budget)
            stats = {**clock.report(), "traffic_moving": _traffic(moving.traffic), **extra,
                     "plan": {"values_bound": total, "values_opened": budget.opened,
                              "values_opened_before": before, "fixed_voxels": self.fixed.grid.numel,
                              "reveal_limit": self.reveal_limit}}
            if to_dealer is not None:
                stats["traffic_dealer"] = _traffic(to_dealer.traffic)
            moving.send(Tag.STATS, stats)
            return stats
        finally:
            self.ledger.settle(self.image_id, moving.peer_fingerprint, total, budget.opened)
            if to_dealer is not None:
                to_dealer.close()


def frame_limit(levels: list[LevelBudget], protocol: str) -> int:
    """The largest frame party 1 may send in a session of this plan (bytes), with slack: MPC, the masked
    U of the largest level (and GMS indices); CKKS, the products of a call (FHE-v2: plus [[W_2]])."""
    if protocol == "mpc":
        return max(lev.points * (lev.cols * 8 + 4) for lev in levels) + (1 << 20)
    slots = CkksParams().slots
    outputs = max(lev.basis * lev.cols + lev.cols for lev in levels)
    cts = -(-outputs * max(lev.features for lev in levels) // slots) + 1
    if protocol == "fhe-v2":
        cts += MAX_V2_CIPHERTEXTS
    return cts * (1 << 20) + (1 << 20)


def run_fixed_party(service: FixedService, listen: str, once: bool = True) -> dict | None:
    """Serve party 1's sessions; ``once``: a single session (its statistics, or its error raised);
    otherwise keep serving, one log line and the connection dropped for any session that fails."""
    listener = Listener(listen, tls_context(service.pki, "fixed", True), service.timeout)
    _announce(listener)
    try:
        while True:
            moving: Channel | None = None
            try:
                moving = listener.accept(("moving",), recorder=service.recorder, wait=not once)
                if once:
                    listener.close()
                stats = service.serve_session(moving)
                _log("fixed", f"session with {moving.peer_role} served ({stats['plan']['values_opened']} values opened)")
                if once:
                    return stats
            except (PrivregError, OSError, ValueError, KeyError, TypeError) as exc:
                _send_error(moving, exc)
                if once:
                    raise
                _log("fixed", f"session dropped: {exc}")
            finally:
                if moving is not None:
                    moving.close()
    finally:
        listener.close()


def _serve_mpc(moving: Channel, to_dealer: Channel, side: FixedSide, session: PublicSession, budget: Budget,
               session_id: str, plan: dict) -> dict:
    """Answer ``level`` and ``cross`` messages with the secret-sharing protocol until ``close``."""
    key = new_key()
    to_dealer.send(Tag.KEY, {"session": session_id, "plan": plan}, key=torch.frombuffer(bytearray(key), dtype=torch.uint8))
    prg = Prg(key)
    cfg = session.cfg
    spec = FeatureSpec(cfg.metric, cfg.bins)
    v_int = bins = None
    level = -1
    while True:
        kind, meta, arr = moving.recv((Tag.LEVEL, Tag.CROSS, Tag.CLOSE))
        if kind == Tag.CLOSE:
            return {"prg_labels": prg.labels_used}
        if kind == Tag.LEVEL:
            level = int(meta["level"])
            budget.start_level(level)
            v = side.features(level, spec)
            one_hot = spec.kind == "mi"
            v_int, v_bits, v_range, v_limbs = encode_features(v, one_hot)
            bins = v.argmax(1) if one_hot else None
            rb = prg.ring(f"Rb/{level}", tuple(v_int.shape))
            moving.send(Tag.FEATURES, {"v_range": v_range, "v_limbs": v_limbs}, vh=v_int - rb, v_bits=v_bits)
            continue
        if int(meta.get("level", -1)) != level:
            raise BudgetExceeded("party 1 asked for a product at a level it has not started")
        if "index" in arr and cfg.sampling.mode != "gms":
            raise BudgetExceeded("party 1 sent sample indices, which the plan's sampling does not use")
        index, phi = session.call_basis(level, meta, arr)
        uh = arr.get("uh")
        if uh is None or uh.dtype != torch.int64 or uh.dim() != 2 or uh.shape[0] != phi.num_points:
            raise PeerError("malformed masked matrix from party 1")
        budget.charge_call(int(uh.shape[0]), int(uh.shape[1]))
        _, dm, darr = to_dealer.recv(Tag.T2)
        if int(dm["call"]) != int(meta["call"]):
            raise PeerError("dealer and party 1 disagree on the call number")
        rows = slice(None) if index is None else index
        z = int_cross(phi, uh, None if bins is not None else v_int[rows],
                      None if bins is None else bins[rows], v_int.shape[1])
        cmask, tmask = budget.need.masks(int(uh.shape[1]), v_int.shape[1] // v_limbs)
        opened = opened_mask(cmask, tmask, z.shape[1], z.shape[0], v_limbs)
        t2 = darr.get("t2")
        if t2 is None or t2.dtype != torch.int64 or tuple(t2.shape) != (int(opened.sum()),):
            raise PeerError("dealer's correlated randomness has the wrong shape")
        moving.send(Tag.REPLY, {"call": meta["call"]}, z=z[opened] + t2)


def _serve_fhe(moving: Channel, side: FixedSide, session: PublicSession, params: CkksParams, version: int,
               budget: Budget) -> dict:
    """Hold the CKKS secret key: send the public context, encrypt features, decrypt masked results,
    and return only the slots that the plan's products occupy.

    FHE-v2 also evaluates the second half of every call on party 1's encrypted weights (party 1's
    public context only) and masks that half before party 1 decrypts it."""
    owner = KeyOwner(params)
    moving.send(Tag.CONTEXT, {}, context=torch.frombuffer(bytearray(owner.public_context()), dtype=torch.uint8))
    peer = None
    if version == 2:
        _, _, arr = moving.recv(Tag.CONTEXT)
        peer = Evaluator(arr["context"].numpy().tobytes(), params)  # refuses a context with a secret key
    prg = Prg(new_key())
    cfg = session.cfg
    spec = FeatureSpec(cfg.metric, cfg.bins)
    v = known = exps = None
    level, decrypted, encryptions = -1, 0, 0
    try:
        while True:
            kind, meta, arr = moving.recv((Tag.LEVEL, Tag.ENCRYPT, Tag.CROSS, Tag.CLOSE))
            if kind == Tag.CLOSE:
                return {"ciphertexts_decrypted": decrypted}
            if kind == Tag.LEVEL:
                level = int(meta["level"])
                budget.start_level(level)
                v, known, encryptions = side.features(level, spec), None, 0
                moving.send(Tag.LEVEL_READY, {"points": int(v.shape[0])})
            elif kind == Tag.ENCRYPT:
                lev = budget.current()
                if v is None or int(meta.get("level", -1)) != level:
                    raise PeerError("encryption requested for a level that was not started")
                if encryptions >= lev.calls:
                    raise BudgetExceeded(f"party 1 asked for more than the plan's {lev.calls} encryptions at level {level}")
                encryptions += 1
                index = session.index(level, meta, {})  # URS: from the public seed; never GMS indices
                known = (v if index is None else v[index]).numpy()
                n1 = v2_split(known.shape[0]) if version == 2 else known.shape[0]
                blobs, exps = owner.encrypt_features(known, n1)
                moving.send(Tag.FEATURES, {"points": n1, "cols": int(known.shape[1])},
                            exps=torch.from_numpy(exps), **pack_bytes(blobs))
            else:
                if known is None:
                    raise PeerError("product requested before the features were encrypted")
                lev = budget.current()
                rows = known.shape[0] if cfg.sampling.mode != "gms" else int(v.shape[0])
                budget.charge_call(lev.points if cfg.sampling.mode == "gms" else rows, lev.cols)
                n1 = v2_split(known.shape[0]) if version == 2 else known.shape[0]
                lay = Layout(n1, known.shape[1], params.slots)
                outputs = output_masks(budget.need, lev.basis, lev.cols, known.shape[1])
                r_total, _, _ = group_shape(lay, outputs.shape[0], params.baby_steps)
                groups = -(-outputs.shape[0] // r_total)
                blobs = unpack_bytes(arr, groups)
                if len(blobs) != groups:
                    raise BudgetExceeded(f"party 1 sent {len(blobs)} ciphertexts; the plan's products fill {groups}")
                slots = opened_slots(outputs, lay.bb, r_total, params.slots)
                vals = owner.decrypt_masked(blobs, params.slots).reshape(-1)[slots]
                decrypted += len(blobs)
                if peer is None:
                    moving.send(Tag.REPLY, {"call": meta["call"]}, values=torch.from_numpy(vals))
                    continue
                if int(meta.get("outputs", -1)) != outputs.shape[0]:
                    raise BudgetExceeded("party 1's output count differs from the plan's")
                moving.send(Tag.REPLY, {"call": meta["call"]},
                            **_second_half(peer, prg, known, exps, vals, outputs, int(meta["call"]), arr))
    finally:
        owner.seal.close()
        if peer is not None:
            peer.seal.close()


def _second_half(peer: Evaluator, prg: Prg, known: np.ndarray, exps: np.ndarray, vals: np.ndarray,
                 outputs: np.ndarray, call: int, arr: dict) -> dict:
    """FHE-v2, party 2: y_1 + M - R at the opened entries and [[y_2 + R + noise]] for its own half
    (entries not opened keep R: party 1 never learns them)."""
    k, b = outputs.shape
    n1 = v2_split(known.shape[0])
    r = uniform_masks(prg, f"R/{call}", (b, peer.seal.slots), peer.params.mask_bits)
    noisy = r + flooding(r.shape, peer.params.flood_bits)  # blurs the CKKS error of party 2's products
    enc = peer.replicated_products(unpack_bytes(arr, MAX_V2_CIPHERTEXTS, "w2"), k, known[n1:] / 2.0 ** exps, noisy)
    return {"values": torch.from_numpy(vals - r[:, :k].T[outputs]), **pack_bytes(enc, "y2")}


# ----------------------------------------------------------------------------- dealer
@dataclass
class _Pending:
    channel: Channel
    meta: dict
    key: bytes


class DealerService:
    """Pairs party 1 and party 2 by session id and provides each session's Phi-weighted triples;
    sees no image-derived value. Keeps serving after a bad client (``once``: one session)."""

    def __init__(self, pki: str, timeout: float = 120.0) -> None:
        self.pki, self.timeout = pki, timeout
        self._waiting: dict[tuple[str, str], _Pending] = {}
        self._lock = threading.Lock()

    def _pair(self, ch: Channel) -> tuple[_Pending, _Pending] | None:
        """Read a connection's first message (its session id and key); the pair once both are in."""
        ch.max_frame = 1 << 20
        _, meta, arr = ch.recv(Tag.KEY)
        sid = meta.get("session")
        key = arr.get("key")
        if not isinstance(sid, str) or not 16 <= len(sid) <= 64 or key is None or key.numel() != 32:
            raise PeerError("malformed session key message")
        with self._lock:
            if (sid, ch.peer_role) in self._waiting:
                raise PeerError("a second connection claims the same session and role")
            self._waiting[(sid, ch.peer_role)] = _Pending(ch, meta, bytes(key.numpy()))
            other = "fixed" if ch.peer_role == "moving" else "moving"
            if (sid, other) not in self._waiting:
                return None
            a, b = self._waiting.pop((sid, "moving")), self._waiting.pop((sid, "fixed"))
        return a, b

    def serve_pair(self, moving: _Pending, fixed: _Pending) -> dict:
        """One session's triples until party 1 closes."""
        clock = _Clock()
        m, f = moving.channel, fixed.channel
        _, meta, _ = m.recv(Tag.SETUP)
        diff = plan_difference(fixed.meta.get("plan") or {}, meta.get("plan"))
        if diff is not None:
            raise PlanMismatch(f"the two parties' plans differ ({diff})")
        grid = grid_from_dict(meta["grid"])
        cfg = config_from_plan(meta["plan"])
        session = PublicSession(cfg, grid)
        budget = Budget(level_budgets(cfg, grid), seam_need(cfg.metric, grid.ndim, cfg.bins))
        m.max_frame = 1 << 24
        prg1, prg2 = Prg(moving.key), Prg(fixed.key)
        rb = None
        level, last_call = -1, -1
        triples = 0
        while True:
            kind, meta, arr = m.recv((Tag.LEVEL, Tag.CROSS, Tag.CLOSE))
            if kind == Tag.CLOSE:
                stats = {**clock.report(), "triples": triples, "traffic_moving": _traffic(m.traffic),
                         "traffic_fixed": _traffic(f.traffic)}
                m.send(Tag.STATS, stats)
                return stats
            if kind == Tag.LEVEL:
                level = int(meta["level"])
                lev = budget.start_level(level)
                b = feature_columns(cfg.metric, cfg.bins)
                rb = prg2.ring(f"Rb/{level}", (session.level_grid(level).numel, b))
                continue
            call = int(meta["call"])
            if call <= last_call:
                raise PeerError("call numbers must increase (a triple is never reused)")
            last_call = call
            index, phi = session.call_basis(level, meta, arr)
            a = int(meta["a"])
            budget.charge_call(phi.num_points, a)
            ra = prg1.ring(f"Ra/{call}", (phi.num_points, a))
            t1 = prg1.ring(f"t1/{call}", (LIMBS, phi.num_basis, a, rb.shape[1]))
            t = int_cross(phi, ra, rb if index is None else rb[index])
            v_limbs = rb.shape[1] // lev.features
            opened = opened_mask(*budget.need.masks(a, lev.features), phi.num_basis, LIMBS, v_limbs)
            f.send(Tag.T2, {"call": call}, t2=(t - t1)[opened])
            triples += 1


def run_dealer(listen: str, pki: str, timeout: float = 120.0, once: bool = True) -> dict | None:
    """Serve sessions (``once``: the first one, its statistics or its error raised)."""
    service = DealerService(pki, timeout)
    listener = Listener(listen, tls_context(pki, "dealer", True), timeout)
    _announce(listener)
    result: dict = {}

    def handle(ch: Channel) -> None:
        pair = None
        try:
            pair = service._pair(ch)
            if pair is None:
                return  # the first of the pair: kept open until its partner arrives
            stats = service.serve_pair(*pair)
            result["stats"] = stats
            _log("dealer", f"session served ({stats['triples']} triples)")
        except (PrivregError, OSError, ValueError, KeyError, TypeError) as exc:
            result["error"] = exc
            chans = [p.channel for p in pair] if pair else [ch]
            for c in chans:
                _send_error(c, exc)
            if not once:
                _log("dealer", f"session dropped: {exc}")
            for c in chans:
                c.close()
            return
        for p in pair:
            p.channel.close()

    try:
        if once:
            while "stats" not in result and "error" not in result:
                handle(listener.accept(("moving", "fixed")))
            listener.close()
            if "error" in result:
                raise result["error"]
            return result["stats"]
        while True:
            try:
                ch = listener.accept(("moving", "fixed"), wait=True)
            except PrivregError as exc:
                _log("dealer", f"connection dropped: {exc}")
                continue
            threading.Thread(target=handle, args=(ch,), daemon=True).start()
    finally:
        listener.close()


# ----------------------------------------------------------------------------- party 1
def run_moving_party(moving: Image, fixed_address: str, dealer_address: str | None, pki: str, cfg,
                     timeout: float = 120.0, reveal_gms_indices: bool = False,
                     progress: Callable[[str], None] | None = None,
                     recorder: list | None = None, protocol: str = "mpc") -> tuple[RegistrationResult, object]:
    """Register ``moving`` to party 2's fixed image; returns the result and the fixed grid.

    ``protocol`` is ``"mpc"`` (needs the dealer), ``"fhe-v1"`` or ``"fhe-v2"`` (CKKS, no dealer); it and
    ``cfg`` must match the plan party 2 states, and CKKS parameters are party 2's (checked here)."""
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown protocol {protocol!r} (choose from {', '.join(PROTOCOLS)})")
    check_secure_config(cfg, reveal_gms_indices, protocol)
    if protocol == "mpc" and not dealer_address:
        raise InputError("the MPC protocol needs the dealer's address")
    clock = _Clock()
    ctx = tls_context(pki, "moving", False)
    to_fixed: Channel | None = None
    to_dealer: Channel | None = None
    backend = None
    session_id = secrets.token_hex(16)
    try:
        to_fixed = connect(fixed_address, ctx, "fixed", timeout, recorder=recorder)
        _, hello, _ = to_fixed.recv(Tag.HELLO)
        fixed_grid = grid_from_dict(hello["grid"])
        if fixed_grid.ndim != moving.ndim:
            raise InputError(f"fixed image is {fixed_grid.ndim}D but moving image is {moving.ndim}D")
        plan = public_plan(protocol, cfg, fixed_grid)
        diff = plan_difference(plan, hello.get("plan"))
        if diff is not None:
            raise PlanMismatch(f"the fixed party's plan differs from this one ({diff})")
        setup = {"plan": plan, "grid": hello["grid"], "session": session_id}
        if protocol == "mpc":
            to_dealer = connect(dealer_address, ctx, "dealer", timeout)
            key = new_key()
            to_dealer.send(Tag.KEY, {"session": session_id}, key=torch.frombuffer(bytearray(key), dtype=torch.uint8))
            to_dealer.send(Tag.SETUP, setup)
            to_fixed.send(Tag.SETUP, setup)
            backend = MPCBackend(to_fixed, to_dealer, key, cfg.sampling.mode, reveal_gms_indices)
        else:
            ckks = CkksParams.from_dict(hello.get("ckks") or {})  # party 2's parameters, checked (128-bit)
            to_fixed.send(Tag.SETUP, setup)
            backend = FHEBackend(to_fixed, ckks, cfg.sampling.mode, _fhe_version(protocol))
        result = register_with_backend(moving, fixed_grid, backend, cfg, progress=progress)
        to_fixed.send(Tag.CLOSE)
        _, fixed_stats, _ = to_fixed.recv(Tag.STATS)
        dealer_stats = None
        if to_dealer is not None:
            to_dealer.send(Tag.CLOSE)
            _, dealer_stats, _ = to_dealer.recv(Tag.STATS)
        result.report["secure"] = _report(protocol, backend, clock, fixed_stats, dealer_stats, to_fixed, to_dealer)
        result.report["secure"]["leakage"] = leakage(protocol, cfg.metric, level_budgets(cfg, fixed_grid))
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
        "values_opened": fixed_stats.get("plan", {}).get("values_opened"),
        "values_bound": fixed_stats.get("plan", {}).get("values_bound"),
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
               timeout: float, cfg: RegistrationConfig | None = None, protocol: str = "mpc", once: bool = False,
               reveal_limit: float = DEFAULT_LIMIT_FRACTION, ledger: str | None = None) -> int:
    """Entry point of ``privreg party fixed`` and ``privreg dealer`` (party 1 runs via the CLI)."""
    try:
        if role == "dealer":
            run_dealer(listen or "127.0.0.1:0", pki, timeout, once)
        elif role == "fixed":
            if not image_path:
                raise InputError("the fixed party needs the FIXED image")
            img = read_image(image_path)
            img.check_finite("fixed image")
            service = FixedService(img, cfg or RegistrationConfig(), protocol, dealer, pki, timeout, reveal_limit,
                                   Ledger(ledger))
            run_fixed_party(service, listen or "127.0.0.1:0", once)
        else:
            raise InputError(f"unknown role {role!r}")
        return 0
    except PrivregError as exc:
        print(f"privreg {role}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
