"""Party 2 enforces its own plan against a dishonest party 1, and keeps serving after bad clients.

Every test runs a real party 2 process (and dealer, for MPC) and a scripted party 1 here."""

from __future__ import annotations

import json
import secrets
import socket
import ssl
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from privreg.fhe.ckks import CkksParams
from privreg.joint import ALL, FeatureSpec
from privreg.mpc.ring import new_key
from privreg.net.channel import PREFIX, PeerError, connect
from privreg.net.pki import make_pki, tls_context
from privreg.objectives import seam_need
from privreg.register import RegistrationConfig
from privreg.secure.fhe_backend import FHEBackend
from privreg.secure.launch import _spawn, _stop, local_parties
from privreg.secure.mpc_backend import MPCBackend
from privreg.secure.parties import run_moving_party
from privreg.secure.plan import PlanMismatch, level_budgets, public_plan
from privreg.secure.session import PublicSession, grid_from_dict

CFG = dict(transform="affine", metric="ssd", levels=(1,), max_iter=2)  # 3 products of 8 values each


def _open_session(peers, cfg, protocol):
    """Scripted party 1: authenticate, agree on the plan, and return a backend to drive by hand."""
    ctx = tls_context(peers["pki"], "moving", False)
    to_fixed = connect(peers["fixed"], ctx, "fixed", 20.0)
    _, hello, _ = to_fixed.recv("hello")
    grid = grid_from_dict(hello["grid"])
    sid = secrets.token_hex(16)
    setup = {"plan": public_plan(protocol, cfg, grid), "grid": hello["grid"], "session": sid}
    if protocol == "mpc":
        to_dealer = connect(peers["dealer"], ctx, "dealer", 20.0)
        key = new_key()
        to_dealer.send("key", {"session": sid}, key=torch.frombuffer(bytearray(key), dtype=torch.uint8))
        to_dealer.send("setup", setup)
        to_fixed.send("setup", setup)
        backend = MPCBackend(to_fixed, to_dealer, key, "full")
    else:
        to_fixed.send("setup", setup)
        backend = FHEBackend(to_fixed, CkksParams.from_dict(hello["ckks"]), "full")
    backend.start_level(0, FeatureSpec("ssd", 32))
    session = PublicSession(cfg, grid)
    return backend, session.basis(0, None), grid


def _honest_u(n: int) -> torch.Tensor:
    return torch.rand(n, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def _exit_code(peers, index=-1) -> int:
    return peers["processes"][index].wait(20)


@pytest.mark.parametrize("protocol", ["mpc", "fhe-v1"])
@pytest.mark.parametrize("attack", ["identity", "extra-column", "extra-call"])
def test_malicious_products_are_refused(pair2d, protocol, attack):
    """An identity U (one column per point: J in one call), one column more than the metric needs and
    one product more than the plan allows: party 2 refuses each, ends the session and exits 2; the
    products the plan allows are answered with exactly the plan's values."""
    cfg = RegistrationConfig(**CFG)
    with local_parties(pair2d["fixed_path"], 20.0, dealer=protocol == "mpc", cfg=cfg, protocol=protocol) as peers:
        backend, basis, grid = _open_session(peers, cfg, protocol)
        n = grid.numel
        need = seam_need("ssd", 2, 32)
        if attack == "extra-call":
            for _ in range(level_budgets(cfg, grid)[0].calls):  # what the plan allows is answered
                res = backend.cross(_honest_u(n), basis, None, need)
                assert int(torch.isfinite(res.cross).sum() + torch.isfinite(res.total).sum()) == 8
            u = _honest_u(n)
        elif attack == "identity":
            u = torch.eye(n, dtype=torch.float64)[:, :256]  # 256 pixels at once
        else:
            u = torch.cat([_honest_u(n), torch.ones(n, 1, dtype=torch.float64)], 1)
        # MPC: refused by shape (or, for the identity U, by the plan's frame limit: the connection is cut).
        # CKKS: the ciphertexts cannot show U's shape; party 2 answers only the plan's 8 slots, which
        # party 1's backend, expecting more, finds malformed.
        expected = "columns|more than the plan|lost|closed" if protocol == "mpc" or attack == "extra-call" else \
            "malformed reply"
        with pytest.raises(PeerError, match=expected):
            backend.cross(u, basis, None, ALL)
        backend.to_fixed.close()
        assert _exit_code(peers) == 2


def test_fhe_party2_decrypts_only_the_plans_slots(pair2d):
    """Party 1 sends back [[J]] itself (masked) as if it were a product: party 2 decrypts it but
    returns only the 8 slots a legitimate SSD affine product occupies (was: all 4096)."""
    cfg = RegistrationConfig(**CFG)
    with local_parties(pair2d["fixed_path"], 20.0, dealer=False, cfg=cfg, protocol="fhe-v1") as peers:
        backend, basis, grid = _open_session(peers, cfg, "fhe-v1")
        feats = backend._features(None)  # [[V]] = [[J, J^2]] under party 2's key
        ch = backend.to_fixed
        from privreg.fhe.ckks import pack_bytes

        ch.send("cross", {"call": 0, "count": 4096}, **pack_bytes([backend.evaluator.seal.save(feats.cts[0])]))
        _, _, reply = ch.recv("reply")
        assert reply["values"].shape == (8,)  # 8 values of 4096: the plan's outputs, nothing more
        ch.send("cross", {"call": 1}, **pack_bytes([backend.evaluator.seal.save(feats.cts[0])] * 2))
        with pytest.raises(PeerError, match="ciphertext"):
            ch.recv("reply")
        assert _exit_code(peers) == 2


@pytest.mark.parametrize("protocol", ["mpc", "fhe-v1"])
def test_a_different_plan_is_refused_on_both_sides(pair2d, protocol):
    cfg = RegistrationConfig(**CFG)
    theirs = RegistrationConfig(**{**CFG, "max_iter": 50})
    with local_parties(pair2d["fixed_path"], 20.0, dealer=protocol == "mpc", cfg=cfg, protocol=protocol) as peers:
        with pytest.raises(PlanMismatch, match="levels"):
            run_moving_party(pair2d["moving"], peers["fixed"], peers["dealer"], peers["pki"], theirs, 20.0,
                             protocol=protocol)
        assert _exit_code(peers) == 2


def test_reveal_limit_holds_across_sessions(pair2d, tmp_path):
    """A persistent ledger: the second session of the same peer on the same image would pass the
    limit, so it is refused although each session alone is within it; a fresh peer is not affected."""
    cfg = RegistrationConfig(**{**CFG, "max_iter": 5})  # 6 x 8 = 48 values
    pki = make_pki(tmp_path / "pki")
    limit = (48 + 10) / pair2d["fixed"].grid.numel  # one session fits; after it (>= 2 products: 16) the next does not
    args = ["party", "fixed", pair2d["fixed_path"], "--listen", "127.0.0.1:0", "--pki", str(pki), "--protocol",
            "fhe-v1", "--transform", "affine", "--metric", "ssd", "--levels", "1", "--iterations", "5",
            "--reveal-limit", repr(limit), "--ledger", str(tmp_path / "ledger.json"), "--timeout", "20"]
    proc, port = _spawn(args, 60.0)
    try:
        addr = f"127.0.0.1:{port}"
        res, _ = run_moving_party(pair2d["moving"], addr, None, str(pki), cfg, 20.0, protocol="fhe-v1")
        assert res.report["secure"]["summary"]["values_bound"] == 48
        with pytest.raises(PeerError, match="reveal-limit"):
            run_moving_party(pair2d["moving"], addr, None, str(pki), cfg, 20.0, protocol="fhe-v1")
        ledger = json.loads((tmp_path / "ledger.json").read_text())
        assert list(ledger.values())[0] and (tmp_path / "ledger.json").stat().st_mode & 0o777 == 0o600
        other = make_pki(tmp_path / "other")  # another CA: refused at the handshake, party 2 keeps serving
        with pytest.raises(PeerError):
            run_moving_party(pair2d["moving"], addr, None, str(other), cfg, 20.0, protocol="fhe-v1")
        assert proc.poll() is None
    finally:
        proc.terminate()
        _stop([proc])


def _bad_clients(addr: str, pki, other_pki, role: str) -> None:
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)))  # unauthenticated: connect and hang up
    s.close()
    s = socket.create_connection((host, int(port)))  # garbage instead of a TLS handshake
    s.sendall(b"\x00\x17 not TLS at all " * 16)
    s.close()
    with pytest.raises(PeerError):  # a certificate from another CA
        connect(addr, tls_context(other_pki, "moving", False), role, 5.0)
    ch = connect(addr, tls_context(pki, "moving", False), role, 5.0)  # authenticated, then a bad frame
    head = b'{"kind": "setup", "meta": {}, "arrays": [{"name": "x", "dtype": "int64", "shape": [[2]]}]}'
    ch._io(ch._tls.write, PREFIX.pack(b"PRV1", len(head), 16) + head + bytes(16))
    ch.close()
    ch = connect(addr, tls_context(pki, "moving", False), role, 5.0)  # an oversized frame
    ch._io(ch._tls.write, PREFIX.pack(b"PRV1", 10, 1 << 40) + b"0123456789")
    ch.close()


@pytest.mark.parametrize("protocol", ["mpc", "fhe-v1"])
def test_services_survive_bad_clients_and_serve_the_next_session(pair2d, tmp_path, protocol):
    cfg = RegistrationConfig(**CFG)
    pki, other = make_pki(tmp_path / "pki"), make_pki(tmp_path / "other")
    procs = []
    try:
        dealer = None
        extra = []
        if protocol == "mpc":
            dproc, dport = _spawn(["dealer", "--listen", "127.0.0.1:0", "--pki", str(pki), "--timeout", "10"], 30.0)
            procs.append(dproc)
            dealer = f"127.0.0.1:{dport}"
            extra = ["--dealer", dealer]
        fproc, fport = _spawn(["party", "fixed", pair2d["fixed_path"], "--listen", "127.0.0.1:0", "--pki", str(pki),
                               "--protocol", protocol, "--transform", "affine", "--levels", "1", "--iterations", "2",
                               "--ledger", "none", "--timeout", "10", *extra], 60.0)
        procs.append(fproc)
        fixed = f"127.0.0.1:{fport}"
        _bad_clients(fixed, pki, other, "fixed")
        if dealer:
            _bad_clients(dealer, pki, other, "dealer")
        for _ in range(2):  # the next legitimate sessions are served, one after the other
            res, _ = run_moving_party(pair2d["moving"], fixed, dealer, str(pki), cfg, 20.0, protocol=protocol)
            assert res.report["secure"]["summary"]["values_opened"] <= 24
        assert all(p.poll() is None for p in procs)
    finally:
        for p in procs:
            p.terminate()
        _stop(procs)
