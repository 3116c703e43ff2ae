"""Two-party secret sharing: ring arithmetic, the seam's product protocol, the channel, the party
processes end to end (private == clear), faults and what is on the wire."""

import struct
import threading
import time

import numpy as np
import pytest
import torch

from privreg.basis import DenseBasis, spline_basis_points
from privreg.grid import Grid
from privreg.image import resample
from privreg.mpc.product import LIMBS, IntBasis, column_bits, decode_cross, encode_features, int_cross, phi_bits
from privreg.mpc.ring import Prg, decode, encode, new_key, random_ring, share, truncate_shares
from privreg.net.channel import Listener, PeerError, connect
from privreg.net.pki import make_pki, tls_context
from privreg.register import RegistrationConfig, register
from privreg.sampling import Sampling
from privreg.secure.launch import local_parties
from privreg.secure.parties import run_moving_party

F64 = torch.float64


# ------------------------------------------------------------------------ ring arithmetic
def test_int_cross_is_exact_mod_2_64():
    """int64 products and sums wrap exactly like Z_2^64 (checked against Python integers)."""
    gen = torch.Generator().manual_seed(0)
    n, a, b = 7, 3, 2
    x, y = random_ring((n, a)), random_ring((n, b))
    phi = IntBasis(4, 0, 8, matrix=torch.randint(-1000, 1000, (1, n, 4), generator=gen))
    got = int_cross(phi, x, y)
    for j in range(4):
        for ia in range(a):
            for ib in range(b):
                ref = sum(int(phi.matrix[0, i, j]) * int(x[i, ia]) * int(y[i, ib]) for i in range(n)) % 2**64
                assert int(got[0, j, ia, ib]) % 2**64 == ref
    bins = torch.tensor([0, 1, 1, 0, 2, 2, 1])
    onehot = torch.nn.functional.one_hot(bins, 3).to(torch.int64)
    assert torch.equal(int_cross(phi, x, None, bins, 3), int_cross(phi, x, onehot))


def _protocol(basis, u, v, one_hot=False):
    """The product protocol's algebra in one place (the parties run exactly these steps)."""
    n = u.shape[0]
    v_int, v_bits, v_range, v_limbs = encode_features(v, one_hot)
    phi = IntBasis.from_basis(basis, phi_bits(n, v_range))
    u_bits = column_bits(phi, u, v_range)
    u_int = encode(u, u_bits)
    k1, k2 = new_key(), new_key()
    p1, p2, d1, d2 = Prg(k1), Prg(k2), Prg(k1), Prg(k2)
    vh = v_int - p2.ring("Rb", tuple(v_int.shape))  # party 2 -> party 1, once
    ra = p1.ring("Ra/0", tuple(u_int.shape))
    t1 = p1.ring("t1/0", (LIMBS, phi.num_basis, u.shape[1], v_int.shape[1]))
    rb = d2.ring("Rb", tuple(v_int.shape))
    t2 = int_cross(phi, d1.ring("Ra/0", tuple(u_int.shape)), rb) - d1.ring("t1/0", tuple(t1.shape))  # dealer
    uh = u_int - ra  # party 1 -> party 2
    z = int_cross(phi, uh, v_int) + t2  # party 2 -> party 1
    return decode_cross(z + t1 + int_cross(phi, ra, vh), u_bits, v_bits, phi, v_limbs), (uh, vh)


@pytest.mark.parametrize("kind", ["dense", "spline", "onehot"])
def test_product_protocol_matches_plaintext(kind):
    gen = torch.Generator().manual_seed(1)
    n = 4000
    pts = torch.rand(n, 2, generator=gen, dtype=F64) * 100
    if kind == "spline":
        basis = spline_basis_points(Grid((13, 13), (10.0, 10.0), (-10.0, -10.0)), pts, 3)
    else:
        basis = DenseBasis(torch.cat([pts - 50, torch.ones(n, 1, dtype=F64)], 1))
    u = torch.randn(n, 4, generator=gen, dtype=F64) * 30
    if kind == "onehot":
        v = torch.nn.functional.one_hot(torch.randint(0, 8, (n,), generator=gen), 8).to(F64)
    else:
        j = torch.rand(n, generator=gen, dtype=F64) * 255
        v = torch.stack([j, j * j], 1)
    (cross, total), _ = _protocol(basis, u, v, kind == "onehot")
    ref = basis.adjoint((u[:, :, None] * v[:, None, :]).reshape(n, -1)).reshape(-1, 4, v.shape[1])
    # random-sign data is the worst case for fixed point (sums cancel); real images do better.
    # Dense features carry 32 bits: the totals (the SSD cost terms) are then good to ~1e-8.
    assert float((cross - ref).abs().max() / ref.abs().max()) < 2e-4
    tol = 2e-4 if kind == "onehot" else 1e-8
    assert bool(((total - u.T @ v).abs() <= tol * (u.abs().T @ v.abs())).all())


def _bits_are_fair(arr) -> None:
    a = torch.as_tensor(np.ascontiguousarray(arr)).reshape(-1)
    bits = ((a[:, None] >> torch.arange(64)) & 1).double().mean(0)
    assert float((bits - 0.5).abs().max()) < 6 * 0.5 / a.numel() ** 0.5 + 1e-3  # 6 sd


def test_masked_values_are_uniform_and_independent_of_the_image():
    """What crosses the boundary (U - Ra, V - Rb) is uniform in Z_2^64, even for a constant image."""
    n = 20000
    u = torch.full((n, 3), 7.0, dtype=F64)
    v = torch.stack([torch.full((n,), 100.0, dtype=F64), torch.full((n,), 1e4, dtype=F64)], 1)
    basis = DenseBasis(torch.ones(n, 1, dtype=F64))
    _, (uh, vh) = _protocol(basis, u, v)
    for arr in (uh, vh):
        _bits_are_fair(arr)  # every bit is a fair coin
        top = (arr.reshape(-1) >> 56) & 0xFF  # chi-square on the top byte
        counts = torch.bincount(top, minlength=256).double()
        chi2 = float(((counts - counts.mean()) ** 2 / counts.mean()).sum())
        assert chi2 < 340  # 255 dof, p ~ 3e-4
        assert int((arr == encode(torch.tensor(7.0), 0)).sum()) == 0


def test_prg_never_reuses_a_label_and_truncation_is_correct():
    prg = Prg(new_key())
    prg.ring("Ra/0", (4,))
    with pytest.raises(RuntimeError, match="reused"):
        prg.ring("Ra/0", (4,))
    x = torch.randn(10000, dtype=F64) * 1000
    s0, s1 = share(encode(x, 32))
    t0, t1 = truncate_shares(s0, s1, 16)
    assert float((decode(t0 + t1, 16) - x).abs().max()) < 2 * 2.0**-16


# ------------------------------------------------------------------------------ channel
def _serve_once(listener, roles, result):
    try:
        ch = listener.accept(roles)
        result["kind"] = ch.recv()[0]
    except Exception as exc:  # noqa: BLE001
        result["error"] = exc


def test_channel_refuses_a_peer_without_a_valid_certificate(tmp_path):
    good, rogue = make_pki(tmp_path / "good"), make_pki(tmp_path / "rogue")
    lst = Listener("127.0.0.1:0", tls_context(good, "fixed", True), timeout=10)
    result: dict = {}
    th = threading.Thread(target=_serve_once, args=(lst, ("moving",), result))
    th.start()
    with pytest.raises(PeerError):
        ch = connect(f"127.0.0.1:{lst.port}", tls_context(rogue, "moving", False), "fixed", timeout=10)
        ch.send("hello")
        ch.recv()
    th.join(10)
    assert isinstance(result.get("error"), PeerError)
    lst.close()
    # a valid certificate for the wrong role is refused too
    lst = Listener("127.0.0.1:0", tls_context(good, "fixed", True), timeout=10)
    result = {}
    th = threading.Thread(target=_serve_once, args=(lst, ("moving",), result))
    th.start()
    with pytest.raises(PeerError):
        connect(f"127.0.0.1:{lst.port}", tls_context(good, "dealer", False), "fixed", timeout=10).recv()
    th.join(10)
    assert "expected moving" in str(result.get("error"))


@pytest.mark.parametrize("frame", ["bad_magic", "oversized", "size_mismatch"])
def test_channel_rejects_malformed_and_oversized_frames(tmp_path, frame):
    pki = make_pki(tmp_path)
    lst = Listener("127.0.0.1:0", tls_context(pki, "fixed", True), timeout=10)
    result: dict = {}

    def serve():
        try:
            ch = lst.accept(("moving",), max_frame=1 << 20)
            ch.recv()
        except Exception as exc:  # noqa: BLE001
            result["error"] = exc

    th = threading.Thread(target=serve)
    th.start()
    ch = connect(f"127.0.0.1:{lst.port}", tls_context(pki, "moving", False), "fixed", timeout=10)
    head = b'{"kind": "x", "meta": {}, "arrays": [{"name": "a", "dtype": "int64", "shape": [4]}]}'
    if frame == "bad_magic":
        raw = struct.pack("!4sIQ", b"EVIL", len(head), 32) + head
    elif frame == "oversized":
        raw = struct.pack("!4sIQ", b"PRV1", len(head), 1 << 40) + head
    else:
        raw = struct.pack("!4sIQ", b"PRV1", len(head), 8) + head + bytes(8)
    ch._io(ch._tls.write, raw)
    th.join(10)
    assert not th.is_alive()
    assert isinstance(result.get("error"), PeerError)
    ch.close()
    lst.close()


def test_silent_peer_times_out(tmp_path):
    pki = make_pki(tmp_path)
    lst = Listener("127.0.0.1:0", tls_context(pki, "fixed", True), timeout=10)
    held = {}
    th = threading.Thread(target=lambda: held.setdefault("ch", lst.accept(("moving",))))
    th.start()
    ch = connect(f"127.0.0.1:{lst.port}", tls_context(pki, "moving", False), "fixed", timeout=1.0)
    t0 = time.monotonic()
    with pytest.raises(PeerError, match="did not answer"):
        ch.recv()
    assert time.monotonic() - t0 < 5
    th.join(5)
    ch.close()
    held["ch"].close()
    lst.close()


# --------------------------------------------------------------- processes, end to end
@pytest.mark.parametrize("transform,metric,sampling", [
    ("affine", "ssd", Sampling("full")),
    ("affine", "ssd", Sampling("urs", 0.2, seed=5)),
    ("rigid", "mi", Sampling("full")),
])
def test_private_registration_equals_clear(pair2d, secure_run, private_matches_clear, transform, metric, sampling):
    kw = dict(transform=transform, metric=metric, levels=(2, 1), max_iter=30, sampling=sampling, grid_spacing=24.0)
    clear = register(pair2d["fixed"], pair2d["moving"], **kw)
    recorder: list = []
    private = secure_run(pair2d, RegistrationConfig(**kw), recorder)
    grid = pair2d["fixed"].grid
    private_matches_clear(private, clear, grid, metric)
    sec = private.report["secure"]
    assert sec["calls"] >= private.report["iterations"]
    assert sec["fixed"]["prg_labels"] == len(private.report["levels"])  # one Rb per level
    assert sec["dealer"]["triples"] == sec["calls"]  # one fresh triple per product
    # online traffic per call: the masked U plus the (P+1) x a x b reply, and little else
    for call in sec["per_call"][:3]:
        a = 4 if metric == "ssd" else 32 * 3
        minimum = call["points"] * a * 8
        assert call["bytes_sent"] < 1.2 * minimum + 4096
    _check_transcript(recorder, pair2d["fixed"], private.report["levels"], sampling.mode == "full")


def _check_transcript(recorder: list, fixed, levels: list[dict], full: bool) -> None:
    """Everything party 1 sent (= what party 2 received) and the masked features it received: int64
    arrays whose every bit is a fair coin and whose columns do not correlate with the fixed image at
    the level's points (which the warped moving image matches after registration)."""
    sent = [(kind, meta, arr) for d, kind, meta, arr in recorder if d == "sent"]
    assert {k for k, _, _ in sent} <= {"setup", "level", "cross", "close"}
    assert all(list(arr) == ["uh"] for k, _, arr in sent if k == "cross")  # no index, no plain value
    assert not any(arr for k, _, arr in sent if k != "cross")
    masked = [("uh", meta["level"], arr["uh"]) for k, meta, arr in sent if k == "cross"]
    level_of = iter(range(len(levels)))
    masked += [("vh", next(level_of), arr["vh"]) for d, k, _, arr in recorder if d == "received" and k == "features"]
    checked = 0
    for name, level, arr in masked:
        assert arr.dtype == np.int64
        _bits_are_fair(arr)
        grid = fixed.grid.downsample(levels[level]["factor"])
        if arr.shape[0] != grid.numel:  # a URS sample: the points are not at hand here
            continue
        j = resample(fixed, grid).data.reshape(-1).double().numpy()
        for col in arr.T:
            assert abs(np.corrcoef(col.astype(np.float64), j)[0, 1]) < 6 / j.size**0.5, name
        checked += 1
    if full:
        assert checked > 0


def test_private_bspline_equals_clear(pair2d, secure_run):
    """Cubic B-spline FFD, SSD, Gauss-Newton in MPC: same transform as CLEAR (0.01 mm RMSE over the
    whole grid, background included) and the known field is recovered."""
    from privreg.evaluate import displacement_rmse, mean_displacement_error

    case = pair2d["bspline"]
    kw = dict(transform="bspline", metric="ssd", levels=(2, 1), max_iter=30, grid_spacing=24.0)
    private = secure_run(case, RegistrationConfig(**kw))
    clear = register(case["fixed"], case["moving"], **kw)
    grid = case["fixed"].grid
    assert float(displacement_rmse(private.transform, clear.transform, grid)) < 0.01
    mask = (case["fixed"].data > 0.05 * case["fixed"].data.max()).reshape(-1)
    assert mean_displacement_error(private.transform, case["truth"], grid, mask) < 0.1


def test_gms_needs_explicit_opt_in(pair2d):
    from privreg.errors import InputError
    from privreg.secure.session import check_secure_config

    with pytest.raises(InputError, match="reveal-gms-indices"):
        check_secure_config(RegistrationConfig(sampling=Sampling("gms", 0.1)), False)
    check_secure_config(RegistrationConfig(sampling=Sampling("gms", 0.1)), True)
    with pytest.raises(InputError, match="clear-only"):
        check_secure_config(RegistrationConfig(sampling=Sampling("urs", 0.1, flat_rate=0.1)), False, "fhe-v1")
    check_secure_config(RegistrationConfig(sampling=Sampling("gms", 0.1)), False, "fhe-v1")  # indices stay local


def _interrupt_fixed_party(pair2d, out, protocol, action, timeout):
    """Run party 1 and do ``action(proc)`` to party 2's process after the first iteration; returns
    (the PeerError raised, seconds until it was raised). Checks no process is left and no OUTDIR."""
    from privreg.outputs import atomic_outdir

    cfg = RegistrationConfig(transform="affine", metric="ssd", levels=(2, 1), max_iter=30,
                             sampling=Sampling("urs", 0.2, seed=5))
    with local_parties(pair2d["fixed_path"], 30.0, dealer=protocol == "mpc", cfg=cfg, protocol=protocol,
                       reveal_limit=1.0) as peers:
        fixed_proc = peers["processes"][-1]

        def progress(msg):
            if "it    1" in msg:
                action(fixed_proc)

        t0 = time.monotonic()
        try:
            with pytest.raises(PeerError) as err:
                with atomic_outdir(out):
                    run_moving_party(pair2d["moving"], peers["fixed"], peers["dealer"], peers["pki"], cfg, timeout,
                                     progress=progress, protocol=protocol)
            elapsed = time.monotonic() - t0
        finally:
            fixed_proc.kill()
        procs = peers["processes"]
    assert all(p.poll() is not None for p in procs)  # dealer and party 2 gone too
    assert not out.exists()
    return err.value, elapsed


@pytest.mark.parametrize("protocol", ["mpc", "fhe-v1", "fhe-v2"])
def test_dead_peer_stops_everything_cleanly(pair2d, tmp_path, protocol):
    """Kill party 2 mid-run: party 1 fails fast with a clear error, the dealer exits, no output."""
    err, elapsed = _interrupt_fixed_party(pair2d, tmp_path / "out", protocol, lambda p: p.kill(), 20.0)
    assert "fixed" in str(err)
    assert elapsed < 20


@pytest.mark.parametrize("protocol", ["mpc", "fhe-v1"])
def test_stalled_peer_times_out_cleanly(pair2d, tmp_path, protocol):
    """Freeze party 2 (SIGSTOP) mid-run: party 1 gives up after its timeout with a clear error."""
    import re
    import signal

    err, elapsed = _interrupt_fixed_party(pair2d, tmp_path / "out", protocol,
                                          lambda p: p.send_signal(signal.SIGSTOP), 6.0)
    assert re.search("did not answer|stopped reading", str(err))
    assert elapsed < 6.0 + 10


ROGUE_FIXED_PARTY = r"""
import struct, sys
from privreg.net.channel import Listener, PREFIX
from privreg.net.pki import tls_context
from privreg.secure.session import grid_to_dict
from privreg.grid import Grid

lst = Listener("127.0.0.1:0", tls_context(sys.argv[1], "fixed", True), 20)
print("LISTENING", lst.port, flush=True)
ch = lst.accept(("moving",))
from privreg.register import RegistrationConfig
from privreg.secure.plan import public_plan
from privreg.fhe.ckks import CkksParams
grid = Grid((64, 64), (2.0, 2.0), (0.0, 0.0))
cfg = RegistrationConfig(transform="affine", metric="ssd", levels=(2, 1), max_iter=5)
ch.send("hello", {"grid": grid_to_dict(grid), "plan": public_plan("fhe-v1", cfg, grid),
                  "ckks": CkksParams().to_dict()})
ch.recv("setup")
head = b'{"kind": "features", "meta": {}, "arrays": []}'
raw = {"oversized": PREFIX.pack(b"PRV1", len(head), 1 << 40) + head,
       "garbage": b"\x00\x17 not a privreg frame at all " * 8}[sys.argv[2]]
ch._io(ch._tls.write, raw)
ch.recv()  # wait until party 1 hangs up
"""


@pytest.mark.parametrize("frame", ["oversized", "garbage"])
def test_rogue_peer_process_is_refused_cleanly(pair2d, tmp_path, frame):
    """A party-2 process with a valid certificate that answers with an oversized or garbage frame:
    party 1 stops at once with a clear error and writes no output."""
    import subprocess
    import sys

    from privreg.outputs import atomic_outdir

    pki = make_pki(tmp_path / "pki")
    proc = subprocess.Popen([sys.executable, "-c", ROGUE_FIXED_PARTY, str(pki), frame], stdout=subprocess.PIPE,
                            text=True)
    try:
        port = int(proc.stdout.readline().split()[1])
        cfg = RegistrationConfig(transform="affine", metric="ssd", levels=(2, 1), max_iter=5)
        out = tmp_path / "out"
        t0 = time.monotonic()
        with pytest.raises(PeerError, match="oversized frame|malformed frame|bad magic"):
            with atomic_outdir(out):
                run_moving_party(pair2d["moving"], f"127.0.0.1:{port}", None, str(pki), cfg, 10.0, protocol="fhe-v1")
        assert time.monotonic() - t0 < 10
        assert not out.exists()
        proc.wait(10)  # the rogue sees party 1 hang up and exits: nothing is left running
    finally:
        proc.kill()
        proc.stdout.close()
