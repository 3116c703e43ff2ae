"""The seam's product with CKKS (TenSEAL / Microsoft SEAL): party 2's features encrypted, party 1's
weights in plaintext, results masked by party 1 before party 2 decrypts them.

Product: y[k, b] = sum_i W[i, k] V[i, b] with W (N x K) held by party 1 (W[:, (j, a)] = Phi_ij U_ia
and one all-ones basis column for the totals) and V (N x b) held by party 2.

Packing (PPIR-FHE-v1, sec. 3.3.2, made rotation-cheap):

* Party 2 normalises each column of V by a power of two (|V| <= 1), pads the columns to ``bb``
  (a power of two) and packs the rows point-major: slot ``s`` of chunk ``c`` holds
  V[c * ppc + s // bb, s % bb] with ``ppc = slots / bb`` points per ciphertext. It sends
  ceil(N / ppc) ciphertexts once per level (or per sample for URS).
* Party 1 normalises each weight column so that sum_i |W[i, k]| <= 1 (powers of two it keeps), and
  evaluates the *hybrid diagonal* matrix product (Halevi-Shoup) with baby-step/giant-step
  rotations: R = R1 * R2 outputs per group, R1 rotations of each input ciphertext computed once
  per level (the features never change), R2 - 1 giant rotations per group and call, then
  log2(slots / (R bb)) rotate-and-add steps. Slot q * bb + b of group g then holds y[g R + q, b].
  A call costs K * chunks plaintext multiplications and one output ciphertext per ``slots / bb``
  outputs; there is no ciphertext-ciphertext multiplication, no relinearisation, no rescaling.
* Masking: party 1 adds a fresh public-key encryption of a uniform mask M in
  [-2^mask_bits, 2^mask_bits] (every slot, CSPRNG) before sending, so party 2 decrypts y + M:
  since |y| <= 1 after normalisation, each value's distribution is within statistical distance
  2^-mask_bits of one independent of y. The fresh encryption also re-randomises the ciphertext.
  Party 2 adds uniform flooding noise of 2^-flood_bits to what it decrypts before replying. This
  blurs, but does *not* statistically drown, the CKKS noise term (up to about 2^-23, see
  :func:`expected_error`), which depends on party 2's secret key (Li & Micciancio 2021). Party 1
  cannot isolate that term, since it does not know V (and so not y), but the protocol has no
  proof against this leakage; a flood statistically larger than the noise (2^40 x) would cost all
  precision at these scales.

FHE-v2 (workload sharing): party 1 also owns a key pair. For the second half of a call's rows it
packs its normalised weights W_2 point-major (slot p * bb + k holds W_2[p, k]) and encrypts them under
its own key; party 2 (:meth:`Evaluator.replicated_products`, on party 1's public context) multiplies
each ciphertext by its plaintext V_2[:, b] replicated over the bb output slots of each point (the
paper's replicate_d), adds the chunks and rotate-and-sums by bb, 2 bb, ..., slots / 2, so slot k holds
y_2[k, b]; it adds a uniform mask R plus flooding noise before party 1 decrypts.

Parameters (:class:`CkksParams`): N = 8192, coefficient moduli 60 + 60 bits plus a 60-bit special
prime (180 bits <= 218, the HE standard's bound for 128-bit classical security at N = 8192; SEAL
enforces it with ``sec_level=tc128``), features at scale 2^40, weights at 2^40: the products sit
at scale 2^80 and |y + M| <= 2^25, below the 2^119 modulus. :func:`expected_error` bounds the
error of a normalised output: the fresh-encryption noise of [[V]] (about 2^-23 per slot at six
standard deviations; W's columns have |w|_1 <= 1, so the product carries at most that), the
double-precision decoding of the 2^25 mask (2^-26) and the flooding (2^-28), 1.35e-7 in all.
The noise term depends on the secret key drawn: over six key pairs the worst output measured was
5.0e-8, more than twice the decoding and flooding terms alone.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
import tempfile
from dataclasses import dataclass, field

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi
import torch
from torch import Tensor

from ..errors import InputError
from ..mpc.ring import Prg
from ..net.channel import PeerError

_SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None  # SEAL serialises through files
# Maximum total coefficient-modulus bits for 128-bit classical security (HomomorphicEncryption.org
# standard, ternary secrets), by polynomial degree; SEAL's own table.
HE_STANDARD_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}


@dataclass(frozen=True)
class CkksParams:
    """CKKS parameters shared by both parties (public)."""

    poly_degree: int = 8192
    coeff_mod_bits: tuple[int, ...] = (60, 60, 60)
    v_scale_bits: int = 40
    w_scale_bits: int = 40
    mask_bits: int = 24
    flood_bits: int = 28
    baby_steps: int = 16

    @property
    def slots(self) -> int:
        return self.poly_degree // 2

    def check(self) -> None:
        limit = HE_STANDARD_128.get(self.poly_degree)
        if limit is None or sum(self.coeff_mod_bits) > limit:
            raise InputError(f"CKKS parameters below 128-bit security: N={self.poly_degree}, "
                             f"log q={sum(self.coeff_mod_bits)} (max {limit})")
        headroom = sum(self.coeff_mod_bits[:-1]) - 1
        if self.v_scale_bits + self.w_scale_bits + self.mask_bits + 2 > headroom:
            raise InputError("CKKS scales and mask do not fit in the ciphertext modulus")

    def to_dict(self) -> dict:
        return {**self.__dict__, "coeff_mod_bits": list(self.coeff_mod_bits)}

    @staticmethod
    def from_dict(d: dict) -> "CkksParams":
        p = CkksParams(**{**d, "coeff_mod_bits": tuple(int(x) for x in d["coeff_mod_bits"])})
        p.check()
        return p


ENCRYPTION_NOISE_SIGMA = 3.2  # SEAL's default error standard deviation


def expected_error(params: CkksParams) -> float:
    """Bound on the absolute error of a normalised output (|y| <= 1, sum_i |w[i, k]| <= 1).

    Three terms: the fresh-encryption noise of the features, 6 sigma sqrt(N (1 + 2N/3)) / 2^v_scale
    per slot (the canonical-embedding bound for e0 + e1 s + u e with a ternary secret: Kim et al.
    2021), which a product with |w|_1 <= 1 carries at most once; decoding y + M (|M| < 2^mask_bits) in
    double precision; the flooding noise."""
    n = params.poly_degree
    fresh = 6 * ENCRYPTION_NOISE_SIGMA * math.sqrt(n * (1 + 2 * n / 3)) / 2.0**params.v_scale_bits
    return fresh + 2.0 ** (params.mask_bits - 50) + 2.0 ** -params.flood_bits


# ----------------------------------------------------------------------------- keys
def rotation_steps(params: CkksParams) -> list[int]:
    """The only rotations the products use: left by 1, 2, 4, ..., slots / 2 (baby and giant steps
    are multiples of bb by powers of two; the folds halve down to bb)."""
    return [1 << i for i in range(int(math.log2(params.slots)))]


def secret_context(params: CkksParams) -> ts.Context:
    """A party's own context: secret and public key (Galois keys: :meth:`KeyOwner.public_context`)."""
    params.check()
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, params.poly_degree, coeff_mod_bit_sizes=list(params.coeff_mod_bits))
    ctx.auto_rescale = False
    return ctx


def join_context(context: bytes, galois: bytes) -> bytes:
    """One blob for the wire: length-prefixed TenSEAL context, then the SEAL Galois keys."""
    return struct.pack("!Q", len(context)) + context + galois


def load_public_context(data: bytes, params: CkksParams) -> "_Seal":
    """The receiving side: load the peer's public context and Galois keys; refuse anything that
    carries a secret key, other parameters or misses a rotation key."""
    try:
        (n,) = struct.unpack("!Q", data[:8])
        if n > len(data) - 8:
            raise ValueError("truncated")
        ctx = ts.context_from(data[8:8 + n])
    except Exception as exc:  # noqa: BLE001 - TenSEAL raises plain exceptions for bad input
        raise PeerError(f"invalid CKKS context from the peer: {exc}") from None
    if ctx.has_secret_key() or not ctx.is_public():
        raise PeerError("the peer sent a context with a secret key; refusing it")
    sc = ctx.seal_context().data
    parms = sc.key_context_data().parms()
    got = (parms.poly_modulus_degree(), tuple(q.bit_count() for q in parms.coeff_modulus()))
    if got != (params.poly_degree, tuple(params.coeff_mod_bits)):
        raise PeerError(f"the peer's CKKS context (N, moduli) = {got} does not match the agreed parameters")
    seal = _Seal(ctx)
    galois = sealapi.GaloisKeys()
    try:
        seal.load(galois, data[8 + n:])
    except Exception as exc:  # noqa: BLE001
        seal.close()
        raise PeerError(f"invalid Galois keys from the peer: {exc}") from None
    if not all(galois.has_key(e) for e in _galois_elements(sc, params)):
        seal.close()
        raise PeerError("the peer's Galois keys miss a rotation the products need")
    seal.galois = galois
    return seal


def _galois_elements(sc, params: CkksParams) -> list[int]:
    return sc.key_context_data().galois_tool().get_elts_from_steps(rotation_steps(params))


class _Seal:
    """SEAL objects behind a TenSEAL context (the low-level API gives rotations and plain products)."""

    def __init__(self, ctx: ts.Context) -> None:
        self.ctx = ctx
        self.sc = ctx.seal_context().data
        self.encoder = sealapi.CKKSEncoder(self.sc)
        self.evaluator = sealapi.Evaluator(self.sc)
        self.galois: sealapi.GaloisKeys | None = None  # the peer's keys (a key owner never rotates)
        self.encryptor = sealapi.Encryptor(self.sc, ctx.public_key().data)
        self.slots = self.encoder.slot_count()
        self._tmp = tempfile.mkdtemp(prefix="privreg-ckks-", dir=_SHM)

    def plain(self, values: np.ndarray, scale: float) -> sealapi.Plaintext:
        pt = sealapi.Plaintext()
        self.encoder.encode(values.tolist(), scale, pt)
        return pt

    def encrypt(self, values: np.ndarray, scale: float) -> sealapi.Ciphertext:
        ct = sealapi.Ciphertext()
        self.encryptor.encrypt(self.plain(values, scale), ct)
        return ct

    def rotate(self, ct, step: int) -> sealapi.Ciphertext:
        out = sealapi.Ciphertext()
        self.evaluator.rotate_vector(ct, step, self.galois, out)
        return out

    def save(self, obj) -> bytes:
        """Serialise a SEAL object (SEAL writes files: through a private temporary directory)."""
        path = os.path.join(self._tmp, "obj")
        try:
            obj.save(path)
            with open(path, "rb") as f:
                return f.read()
        finally:
            with contextlib.suppress(OSError):
                os.remove(path)

    def load(self, obj, data: bytes) -> None:
        path = os.path.join(self._tmp, "obj")
        try:
            with open(path, "wb") as f:
                f.write(data)
            obj.load(self.sc, path)
        finally:
            with contextlib.suppress(OSError):
                os.remove(path)

    def from_bytes(self, data: bytes) -> sealapi.Ciphertext:
        ct = sealapi.Ciphertext()
        try:
            self.load(ct, data)
        except Exception as exc:  # noqa: BLE001
            raise PeerError(f"malformed ciphertext from peer: {exc}") from None
        if ct.poly_modulus_degree() != self.encoder.slot_count() * 2 or ct.size() != 2:
            raise PeerError("ciphertext from peer does not match the agreed parameters")
        return ct

    def close(self) -> None:
        with contextlib.suppress(OSError):  # a ciphertext file left by an interrupted call
            os.rmdir(self._tmp)


def pack_bytes(blobs: list[bytes], prefix: str = "ct") -> dict[str, Tensor]:
    """Several serialised ciphertexts as two arrays for one channel frame."""
    lengths = torch.tensor([len(b) for b in blobs], dtype=torch.int64)
    data = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8) if blobs else torch.zeros(0, dtype=torch.uint8)
    return {f"{prefix}_lengths": lengths, f"{prefix}_data": data}


def unpack_bytes(arrays: dict[str, Tensor], max_count: int, prefix: str = "ct") -> list[bytes]:
    lengths, data = arrays.get(f"{prefix}_lengths"), arrays.get(f"{prefix}_data")
    if lengths is None or data is None or lengths.dim() != 1 or lengths.numel() > max_count:
        raise PeerError("malformed ciphertext list from peer")
    if bool((lengths < 0).any()) or int(lengths.sum()) != data.numel():
        raise PeerError("ciphertext lengths do not match the data sent")
    raw = data.numpy().tobytes()
    out, pos = [], 0
    for n in lengths.tolist():
        out.append(raw[pos:pos + n])
        pos += n
    return out


# ----------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Layout:
    """Point-major packing of an (N x b) matrix into ciphertexts of ``slots`` slots."""

    num_points: int
    cols: int
    slots: int

    @property
    def bb(self) -> int:
        return 1 << max(0, math.ceil(math.log2(max(self.cols, 1))))

    @property
    def ppc(self) -> int:
        return self.slots // self.bb

    @property
    def chunks(self) -> int:
        return max(1, -(-self.num_points // self.ppc))

    def pack(self, v: np.ndarray) -> np.ndarray:
        """(N, cols) -> (chunks, slots)."""
        out = np.zeros((self.chunks * self.ppc, self.bb))
        out[:self.num_points, :self.cols] = v
        return out.reshape(self.chunks, self.slots)


def column_exponents(x: np.ndarray, norm: str) -> np.ndarray:
    """Powers of two e with max|x[:, k]| <= 2^e (``"max"``) or sum|x[:, k]| <= 2^e (``"sum"``)."""
    m = np.abs(x).max(0) if norm == "max" else np.abs(x).sum(0)
    return np.ceil(np.log2(np.maximum(m, 1e-300))).astype(np.int64)


def uniform_masks(prg: Prg, label: str, shape: tuple[int, int], bits: int) -> np.ndarray:
    """Masks uniform on [-2^bits, 2^bits) (53-bit resolution) from the CSPRNG; a label is used once."""
    raw = prg.ring(label, shape).numpy().view(np.uint64)
    unit = (raw >> np.uint64(11)).astype(np.float64) / 2.0**53
    return (2.0 * unit - 1.0) * 2.0**bits


# ----------------------------------------------------------------------------- party 2
class KeyOwner:
    """Party 2: encrypts its (normalised) features and decrypts masked results."""

    def __init__(self, params: CkksParams) -> None:
        self.params = params
        self.ctx = secret_context(params)
        self.seal = _Seal(self.ctx)
        self.decryptor = sealapi.Decryptor(self.seal.sc, self.ctx.secret_key().data)

    def public_context(self) -> bytes:
        """What the peer receives: parameters, public key and seeded (SEAL-compressed) Galois keys for
        :func:`rotation_steps` only: 12 keys, 4.7 MB at N = 8192, instead of TenSEAL's default 23
        keys for every power-of-two rotation both ways (18.9 MB). Never the secret key."""
        base = self.ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False,
                                  save_relin_keys=False)
        keygen = sealapi.KeyGenerator(self.seal.sc, self.ctx.secret_key().data)
        return join_context(base, self.seal.save(keygen.create_galois_keys(_galois_elements(self.seal.sc, self.params))))

    def encrypt_features(self, v: np.ndarray, rows: int | None = None) -> tuple[list[bytes], np.ndarray]:
        """Normalised, packed, encrypted V[:rows]; returns the ciphertexts and the column exponents.

        The exponents bound all of ``v`` (FHE-v2: party 2's own half of the rows shares the scale)."""
        exps = column_exponents(v, "max")
        return self.encrypt_packed(v[:rows] / 2.0 ** exps, self.params.v_scale_bits), exps

    def encrypt_packed(self, x: np.ndarray, scale_bits: int) -> list[bytes]:
        """Point-major :class:`Layout` packing of a normalised (N, cols) matrix, one ciphertext per chunk."""
        layout = Layout(x.shape[0], x.shape[1], self.seal.slots)
        return [self.seal.save(self.seal.encrypt(row, 2.0 ** scale_bits)) for row in layout.pack(x)]

    def decrypt(self, blobs: list[bytes], count: int) -> np.ndarray:
        """The first ``count`` slots of each ciphertext (no noise added: for this party's own use)."""
        if not 0 < count <= self.seal.slots:
            raise PeerError("invalid slot count requested")
        out = np.empty((len(blobs), count))
        for g, blob in enumerate(blobs):
            ct = self.seal.from_bytes(blob)
            pt = sealapi.Plaintext()
            self.decryptor.decrypt(ct, pt)
            out[g] = np.asarray(self.seal.encoder.decode_double(pt))[:count]
        return out

    def decrypt_masked(self, blobs: list[bytes], count: int) -> np.ndarray:
        """Decrypt masked ciphertexts the peer made, keep ``count`` slots each, add flooding noise."""
        out = self.decrypt(blobs, count)
        return out + flooding(out.shape, self.params.flood_bits)


def flooding(shape: tuple[int, ...], bits: int) -> np.ndarray:
    """Uniform noise on [-2^-bits, 2^-bits] from the OS CSPRNG (blurs, but does not statistically
    drown, the CKKS error term: see the module docstring)."""
    n = math.prod(shape)
    noise = np.frombuffer(os.urandom(8 * n), dtype=np.uint64).astype(np.float64) / 2.0**64
    return (2 * noise.reshape(shape) - 1) * 2.0 ** -bits


def v2_split(num_points: int) -> int:
    """FHE-v2: party 1 computes on the first rows [0, n1) of a call, party 2 on the rest."""
    return (num_points + 1) // 2


# ----------------------------------------------------------------------------- party 1
@dataclass
class EncryptedFeatures:
    """Party 1's copy of [[V]] for one level (or sample) with its precomputed baby-step rotations."""

    layout: Layout
    exps: np.ndarray
    cts: list
    baby: list = field(default_factory=list)  # baby[c][r1] = rot(cts[c], r1 * bb)


class Evaluator:
    """Party 1: plaintext-ciphertext products on the public context only."""

    def __init__(self, public_context: bytes, params: CkksParams) -> None:
        self.params = params
        self.seal = load_public_context(public_context, params)
        self.ctx = self.seal.ctx

    def features(self, blobs: list[bytes], exps: np.ndarray, num_points: int, cols: int) -> EncryptedFeatures:
        layout = Layout(num_points, cols, self.seal.slots)
        if len(blobs) != layout.chunks or exps.shape != (cols,):
            raise PeerError("encrypted features do not match the agreed layout")
        return EncryptedFeatures(layout, exps, [self.seal.from_bytes(b) for b in blobs])

    def _baby(self, feats: EncryptedFeatures, r1: int) -> None:
        """Make sure rotations 0..r1-1 (times bb) of every chunk exist (computed once per level)."""
        if not feats.baby:
            feats.baby = [[ct] for ct in feats.cts]
        for row in feats.baby:
            while len(row) < r1:
                row.append(self.seal.rotate(row[-1], feats.layout.bb))

    def products(self, feats: EncryptedFeatures, w: np.ndarray, masks: np.ndarray) -> list[bytes]:
        """Masked encryptions of y = W^T V (normalised), one ciphertext per group of outputs.

        ``w`` (N, K) with sum_i |w[i, k]| <= 1; ``masks`` (groups, slots). Returns ciphertexts whose
        slot q * bb + b of group g decrypts to y[g R + q, b] + masks[g, q * bb + b].
        """
        lay, p, seal = feats.layout, self.params, self.seal
        r_total, r1, r2 = self.group_shape(lay, w.shape[1])
        groups = -(-w.shape[1] // r_total)
        if masks.shape != (groups, lay.slots):
            raise ValueError("mask shape does not match the output groups")
        self._baby(feats, r1)
        wp = np.zeros((lay.chunks * lay.ppc, groups * r_total))
        wp[:w.shape[0], :w.shape[1]] = w
        wc = wp.reshape(lay.chunks, lay.ppc, groups * r_total)
        t = np.arange(lay.ppc)
        w_scale = 2.0 ** p.w_scale_bits
        out_scale = 2.0 ** (p.v_scale_bits + p.w_scale_bits)
        active = np.abs(wc).reshape(lay.chunks, lay.ppc, groups, r_total).sum((1, 3)) > 0  # (chunks, groups)
        blobs = []
        for g in range(groups):
            acc = None
            for j2 in reversed(range(r2)):
                inner = None
                k = g * r_total + (t - r1 * j2) % r_total  # output served by each point slot
                for c in np.nonzero(active[:, g])[0]:
                    for j1 in range(r1):
                        e = wc[c, (t + j1) % lay.ppc, k]
                        inner = self._multiply_add(inner, feats.baby[c][j1], np.repeat(e, lay.bb), w_scale)
                if acc is not None:  # Horner on the giant steps: acc = rot(acc, R1 bb) + inner
                    acc = seal.rotate(acc, r1 * lay.bb)
                    if inner is not None:
                        seal.evaluator.add_inplace(acc, inner)
                else:
                    acc = inner
            if acc is None:  # no weight in this group: an encryption of zero
                acc = seal.encrypt(np.zeros(lay.slots), out_scale)
            self._fold(acc, r_total * lay.bb)
            mask_ct = seal.encrypt(masks[g], acc.scale)
            seal.evaluator.add_inplace(acc, mask_ct)
            blobs.append(seal.save(acc))
        return blobs

    def replicated_products(self, blobs: list[bytes], outputs: int, v: np.ndarray, masks: np.ndarray) -> list[bytes]:
        """FHE-v2, party 2's half: y[k, b] = sum_i [[W[i, k]]] V[i, b] with W encrypted by the peer.

        ``blobs``: the peer's [[W]] (n x outputs, point-major :class:`Layout`); ``v`` (n, b) plaintext,
        normalised; ``masks`` (b, slots). Per column b: multiply each chunk by V[:, b] replicated over
        the chunk's output slots, add the chunks, then rotate-and-sum by bb, 2 bb, ... slots / 2.
        Returns one ciphertext per column b whose slot k decrypts to y[k, b] + masks[b, k].
        """
        lay, seal = Layout(v.shape[0], outputs, self.seal.slots), self.seal
        if len(blobs) != lay.chunks or masks.shape != (v.shape[1], lay.slots):
            raise PeerError("encrypted weights do not match the agreed layout")
        cts = [seal.from_bytes(b) for b in blobs]
        vp = np.zeros((lay.chunks * lay.ppc, v.shape[1]))
        vp[:v.shape[0]] = v
        v_scale = 2.0 ** self.params.v_scale_bits
        out = []
        for col in range(v.shape[1]):
            acc = None
            for c, ct in enumerate(cts):
                acc = self._multiply_add(acc, ct, np.repeat(vp[c * lay.ppc:(c + 1) * lay.ppc, col], lay.bb), v_scale)
            if acc is None:
                acc = seal.encrypt(np.zeros(lay.slots), 2.0 ** (self.params.v_scale_bits + self.params.w_scale_bits))
            self._fold(acc, lay.bb)
            seal.evaluator.add_inplace(acc, seal.encrypt(masks[col], acc.scale))
            out.append(seal.save(acc))
        return out

    def _multiply_add(self, acc, ct, values: np.ndarray, scale: float):
        """acc + ct * plain(values) (acc may be None); skips weights that encode to the zero plaintext
        (nothing to add, and SEAL refuses a "transparent" product)."""
        if not values.any():
            return acc
        pt = self.seal.plain(values, scale)
        if pt.is_zero():
            return acc
        prod = sealapi.Ciphertext()
        self.seal.evaluator.multiply_plain(ct, pt, prod)
        if acc is None:
            return prod
        self.seal.evaluator.add_inplace(acc, prod)
        return acc

    def _fold(self, acc, smallest: int) -> None:
        """Rotate-and-add in place by smallest, 2 smallest, ..., slots / 2 (sums slots congruent
        modulo ``smallest``)."""
        step = self.seal.slots // 2
        while step >= smallest:
            self.seal.evaluator.add_inplace(acc, self.seal.rotate(acc, step))
            step //= 2

    def group_shape(self, lay: Layout, k: int) -> tuple[int, int, int]:
        return group_shape(lay, k, self.params.baby_steps)


def group_shape(lay: Layout, k: int, baby_steps: int) -> tuple[int, int, int]:
    """Outputs per group R = R1 * R2 (a power of two <= points per ciphertext), R1, R2."""
    r_total = min(1 << max(0, math.ceil(math.log2(max(k, 1)))), lay.ppc)
    r1 = min(baby_steps, r_total)
    return r_total, r1, r_total // r1
