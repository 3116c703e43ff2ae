"""PPIR-FHE-v1 and -v2 (CKKS): the packed products, the keys each party may hold, masking, end to end."""


import numpy as np
import pytest
import tenseal as ts

from privreg.errors import InputError
from privreg.fhe.ckks import (CkksParams, Evaluator, KeyOwner, column_exponents, expected_error, join_context,
                              load_public_context, uniform_masks)
from privreg.mpc.ring import Prg, new_key
from privreg.net.channel import PeerError
from privreg.register import RegistrationConfig, register
from privreg.sampling import Sampling

PARAMS = CkksParams()


@pytest.fixture(scope="module")
def keys():
    owner = KeyOwner(PARAMS)
    return owner, Evaluator(owner.public_context(), PARAMS)


def _product(keys, w, v, masks=None):
    owner, ev = keys
    blobs, vexp = owner.encrypt_features(v)
    feats = ev.features(blobs, vexp, *v.shape)
    wexp = column_exponents(w, "sum")
    r, _, _ = ev.group_shape(feats.layout, w.shape[1])
    groups = -(-w.shape[1] // r)
    if masks is None:
        masks = np.random.default_rng(1).uniform(-1, 1, (groups, PARAMS.slots)) * 2.0**PARAMS.mask_bits
    out = ev.products(feats, w / 2.0**wexp, masks)
    count = r * feats.layout.bb
    seen = owner.decrypt_masked(out, count)  # what party 2 sees
    y = (seen - masks[:, :count]).reshape(groups * r, feats.layout.bb)[:w.shape[1], :v.shape[1]]
    return y * 2.0**wexp[:, None] * 2.0**vexp[None, :], seen


@pytest.mark.parametrize("n,b,k,sparse", [(5000, 2, 12, False), (700, 8, 300, False), (3000, 2, 40, True)])
def test_packed_product_matches_plaintext(keys, n, b, k, sparse):
    """Several chunks, several output groups, chunks with no weight: W^T V to the documented error."""
    rng = np.random.default_rng(n)
    v = rng.random((n, b)) * 255
    w = rng.standard_normal((n, k))
    if sparse:  # each column supported on a band of rows, like a B-spline basis function
        rows = np.arange(n)[:, None]
        w *= (np.abs(rows - np.linspace(0, n, k)[None, :]) < 200)
    y, _ = _product(keys, w, v)
    scale = 2.0 ** column_exponents(w, "sum")[:, None] * 2.0 ** column_exponents(v, "max")[None, :]
    err = np.abs(y - w.T @ v) / scale  # in the normalised units the bound is stated in
    assert err.max() < expected_error(PARAMS)


@pytest.mark.parametrize("n,b,k", [(3000, 2, 8), (700, 3, 40)])
def test_replicated_product_matches_plaintext(n, b, k):
    """FHE-v2, party 2's half: [[W]] (party 1's key) times plaintext V, rotate-and-sum, masked by R."""
    party1 = KeyOwner(PARAMS)  # party 1 owns this key pair; party 2 gets only its public context
    party2 = Evaluator(party1.public_context(), PARAMS)
    rng = np.random.default_rng(k)
    v = rng.random((n, b))
    w = rng.standard_normal((n, k))
    w = w / 2.0 ** column_exponents(w, "sum")
    r = uniform_masks(Prg(new_key()), "R", (b, PARAMS.slots), PARAMS.mask_bits)
    out = party2.replicated_products(party1.encrypt_packed(w, PARAMS.w_scale_bits), k, v, r)
    y = party1.decrypt(out, k) - r[:, :k]  # (b, k)
    # log2(slots / bb) rotations add key-switching noise on top of the decoding error
    assert np.abs(y.T - w.T @ v).max() < 2 * expected_error(PARAMS)
    with pytest.raises(PeerError, match="layout"):
        party2.replicated_products(party1.encrypt_packed(w[:10], PARAMS.w_scale_bits), k, v, r)


def test_party2_sees_only_masked_values(keys):
    """What party 2 decrypts is the mask plus a value below 1: flat, and independent of y."""
    rng = np.random.default_rng(3)
    v = rng.random((2000, 2))
    w_small, w_big = rng.random((2000, 4)) * 1e-3, rng.random((2000, 4))
    _, seen_a = _product(keys, w_small, v)
    _, seen_b = _product(keys, w_big, v)
    for seen in (seen_a, seen_b):
        assert np.abs(seen).max() < 2.0**PARAMS.mask_bits + 2
        assert np.abs(seen).mean() > 2.0**(PARAMS.mask_bits - 2)  # uniform on +-2^24 has mean 2^23
    # fresh masks from party 1's CSPRNG: two calls look unrelated, a label is never reused
    prg = Prg(new_key())
    m1, m2 = (uniform_masks(prg, f"M/{c}", (2, 4096), 24) for c in (0, 1))
    assert abs(np.corrcoef(m1.ravel(), m2.ravel())[0, 1]) < 0.03
    assert abs(m1.mean()) < 2.0**24 * 0.03 and abs(m1.std() / 2.0**24 - 3**-0.5) < 0.02
    with pytest.raises(RuntimeError, match="reused"):
        uniform_masks(prg, "M/0", (2, 4096), 24)


def test_party1_never_holds_a_secret_key(keys):
    owner, ev = keys
    assert not ev.ctx.has_secret_key() and ev.ctx.is_public()
    with pytest.raises(Exception):
        ts.ckks_vector(ev.ctx, [1.0, 2.0]).decrypt()
    # a context carrying the secret key is refused outright
    with pytest.raises(PeerError, match="secret key"):
        load_public_context(join_context(owner.ctx.serialize(save_secret_key=True), b""), PARAMS)
    # and the secret key's bytes appear nowhere in what party 1 received
    secret = owner.ctx.secret_key().data
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as td:
        secret.save(os.path.join(td, "sk"))
        sk = open(os.path.join(td, "sk"), "rb").read()
    public = owner.public_context()
    assert sk[-64:] not in public and sk[100:164] not in public
    # seeded Galois keys for the 12 left power-of-two rotations only (TenSEAL's default: 19.3 MB)
    assert len(public) < 6e6
    with pytest.raises(PeerError, match="Galois keys"):  # keys cut short
        load_public_context(public[:-1000], PARAMS)
    with pytest.raises(PeerError, match="agreed parameters"):
        load_public_context(public, CkksParams(poly_degree=16384, coeff_mod_bits=(60, 60, 60)))


def test_parameters_meet_128_bit_security():
    PARAMS.check()
    assert sum(PARAMS.coeff_mod_bits) <= 218 and PARAMS.poly_degree == 8192
    with pytest.raises(InputError, match="128-bit"):
        CkksParams(poly_degree=4096, coeff_mod_bits=(60, 60, 60)).check()
    with pytest.raises(InputError, match="do not fit"):
        CkksParams(coeff_mod_bits=(60, 40, 60)).check()


# --------------------------------------------------------------- processes, end to end
@pytest.mark.parametrize("protocol,transform,metric,sampling", [
    ("fhe-v1", "affine", "ssd", Sampling("urs", 0.2, seed=5)),
    ("fhe-v1", "affine", "ssd", Sampling("gms", 0.2, seed=5)),
    ("fhe-v1", "rigid", "mi", Sampling("urs", 0.1, seed=5, redraw=False)),
    ("fhe-v2", "affine", "ssd", Sampling("urs", 0.2, seed=5)),
])
def test_fhe_registration_equals_clear(pair2d, secure_run, private_matches_clear, protocol, transform, metric,
                                       sampling):
    kw = dict(transform=transform, metric=metric, levels=(2, 1), max_iter=30, sampling=sampling, bins=16)
    clear = register(pair2d["fixed"], pair2d["moving"], **kw)
    recorder: list = []
    private = secure_run(pair2d, RegistrationConfig(**kw), recorder, protocol=protocol)
    private_matches_clear(private, clear, pair2d["fixed"].grid, metric)
    sec = private.report["secure"]
    assert sec["protocol"] == protocol and "dealer" not in sec
    # per call party 1 sends a few ciphertexts (v1: one per 4096 / bb outputs; v2: plus its encrypted
    # half of W, outputs x points / 4096), nothing else
    per = sec["per_call"][0]
    assert per["ciphertexts_sent"] <= {"fhe-v1": 2 if metric == "ssd" else 4, "fhe-v2": 4}[protocol]
    assert sec["moving"]["online_bytes_sent_per_call"] < per["ciphertexts_sent"] * 300_000
    if protocol == "fhe-v2":  # party 1's own key: party 2 received only its public context
        ctx = next(arr["context"] for d, kind, _, arr in recorder if d == "sent" and kind == "context")
        assert load_public_context(np.asarray(ctx).tobytes(), CkksParams()).ctx.is_public()
    # GMS points never leave party 1; party 2 is only ever told level and iteration numbers
    sent = [(kind, meta, arr) for d, kind, meta, arr in recorder if d == "sent"]
    assert all("index" not in arr for _, _, arr in sent)
    if sampling.mode == "gms":
        assert all(meta.get("sample") is None for kind, meta, _ in sent if kind == "encrypt")
