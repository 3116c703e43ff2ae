"""Party 1's side of the seam over CKKS (PPIR-FHE-v1 and -v2, see :mod:`privreg.fhe.ckks`).

FHE-v1: per level (URS: per sample) party 2 sends [[V]], its features encrypted under its own key;
every call party 1 forms the plaintext weights W[:, (j, a)] = Phi_ij U_ia (plus the totals),
evaluates W^T [[V]] homomorphically, masks the result and sends it to party 2, which decrypts and
returns the masked values; party 1 removes the masks. GMS indices never leave party 1: it weighs the
full level's [[V]] with zeros off the sample.

FHE-v2 (workload sharing, the paper's appendix figure 4): the call's rows are split in two halves.
Party 1 evaluates its half as in v1 on [[V_1]] (party 2's key). For the second half party 1 encrypts
W_2 under its *own* key and sends it; party 2 multiplies [[W_2]] by its plaintext V_2 replicated over
the output slots and rotate-and-sums (no dot products), adds a uniform mask R (plus flooding noise)
and returns [[y_2 + R]]; it also decrypts party 1's masked half and returns y_1 + M - R. Party 1
decrypts [[y_2 + R]] with its own key and adds: y = (y_1 + M - R) - M + (y_2 + R).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import Tensor

from ..basis import Basis
from ..errors import InputError
from ..fhe.ckks import (CkksParams, Evaluator, KeyOwner, Layout, column_exponents, pack_bytes, uniform_masks,
                        unpack_bytes, v2_split)
from ..joint import ALL, BackendStats, Columns, CrossResult, FeatureSpec, JointBackend, Need, dense_columns
from ..mpc.ring import Prg, new_key
from ..net.channel import Channel, PeerError

MAX_WEIGHT_ENTRIES = 40_000_000  # dense W (points x outputs) party 1 is willing to build (320 MB)
MAX_V2_CIPHERTEXTS = 64  # FHE-v2: encrypted weight ciphertexts party 1 sends per call (about 0.26 MB each)


def weight_matrix(u: Tensor, phi: Tensor, need: Need = ALL) -> np.ndarray:
    """W (N, P a' + a''): columns (j, a) = Phi_j * U_a for the needed cross columns a (j-major),
    then the needed total columns U_a. ``phi`` is the dense basis (N, P)."""
    uc, ut = u[:, need.cross_cols].to(torch.float64), u[:, need.total_cols].to(torch.float64)
    n, a = uc.shape
    p = phi.shape[1]
    if n * (p * a + ut.shape[1]) > MAX_WEIGHT_ENTRIES:
        raise InputError(f"the FHE product would need a {n} x {p * a + ut.shape[1]} weight matrix; use fewer "
                         "points (--sampling urs) or a coarser control grid")
    return torch.cat([(phi[:, :, None] * uc[:, None, :]).reshape(n, p * a), ut], 1).numpy()


def output_masks(need: Need, p: int, a: int, b: int) -> np.ndarray:
    """Bool (K, b): which values of each output of :func:`weight_matrix` the update reads (K = p a' + a'')."""
    cross, total = need.masks(a, b)
    rows = [cross[range(a)[need.cross_cols]]] * p + [total[range(a)[need.total_cols]]]
    return torch.cat(rows, 0).numpy()


def opened_slots(outputs: np.ndarray, bb: int, r_total: int, slots: int) -> np.ndarray:
    """Flat indices into (groups, slots) of the opened values: output o, column c sits in group
    o // R at slot (o % R) bb + c (:meth:`Evaluator.products`); ``outputs`` is :func:`output_masks`."""
    o, c = np.nonzero(outputs)
    return (o // r_total) * slots + (o % r_total) * bb + c


class FHEBackend(JointBackend):
    """Joint products by CKKS with party 2 holding the secret key."""

    def __init__(self, to_fixed: Channel, params: CkksParams, sampling_mode: str, version: int = 1) -> None:
        if version not in (1, 2):
            raise ValueError(f"FHE protocol version must be 1 or 2, got {version}")
        self.to_fixed = to_fixed
        self.params = params
        self.sampling_mode = sampling_mode
        self.version = version
        _, _, arr = to_fixed.recv("context")
        self.evaluator = Evaluator(arr["context"].numpy().tobytes(), params)
        self.own: KeyOwner | None = None
        if version == 2:  # party 1's own key pair: party 2 gets only its public context
            self.own = KeyOwner(params)
            to_fixed.send("context", {}, context=torch.frombuffer(bytearray(self.own.public_context()), dtype=torch.uint8))
        self.prg = Prg(new_key())
        self.level = -1
        self.calls = 0
        self.sample_key: tuple[int, int] | None = None
        self.spec: FeatureSpec | None = None
        self.level_points = 0
        self._feats: tuple | None = None  # (key, EncryptedFeatures)
        self._phi: tuple | None = None  # (key, dense basis): built once per level / fixed sample
        self.stats = BackendStats()
        self.per_call: list[dict] = []

    def start_level(self, level: int, spec: FeatureSpec) -> None:
        self.to_fixed.send("level", {"level": level, "kind": spec.kind, "bins": spec.bins})
        _, meta, _ = self.to_fixed.recv("level-ready")
        self.level_points = int(meta["points"])
        self.level, self.spec, self._feats = level, spec, None

    def note_sample(self, level: int, iteration: int, index: Tensor | None) -> None:
        self.sample_key = (level, iteration)

    def _dense_basis(self, basis: Basis, index: Tensor | None) -> Tensor:
        """Phi as a dense float64 matrix, converted once per (level, sample) rather than every call."""
        key = (self.level, self.sample_key if index is not None else None)
        if self._phi is None or self._phi[0] != key:
            self._phi = (key, basis.dense().to(torch.float64))
        return self._phi[1]

    def _features(self, index: Tensor | None):
        """[[V]] for this call's rows: the whole level (full, GMS) or the public URS sample (v2: the
        first half of those rows)."""
        sample = list(self.sample_key) if (index is not None and self.sampling_mode != "gms") else None
        key = (self.level, tuple(sample) if sample else None)
        if self._feats is None or self._feats[0] != key:
            n = self.level_points if sample is None else int(index.numel())
            if self.version == 2:
                n = v2_split(n)
            self.to_fixed.send("encrypt", {"level": self.level, "sample": sample, "rows": n})
            _, meta, arr = self.to_fixed.recv("features")
            if int(meta["points"]) != n:
                raise PeerError("the fixed party encrypted a different number of points")
            blobs = unpack_bytes(arr, 1 << 20)
            self._feats = (key, self.evaluator.features(blobs, arr["exps"].numpy(), n, int(meta["cols"])))
        return self._feats[1]

    def cross(self, u: Tensor | Columns, basis: Basis, index: Tensor | None, need: Need = ALL) -> CrossResult:
        u = dense_columns(u)
        if self.spec is None:
            raise RuntimeError("start_level must be called before cross")
        t0, c0 = time.perf_counter(), time.process_time()
        sent0, recv0 = self.to_fixed.traffic.sent, self.to_fixed.traffic.received
        feats = self._features(index)
        w = weight_matrix(u, self._dense_basis(basis, index), need)
        if index is not None and self.sampling_mode == "gms":  # scatter onto the level's rows, locally
            full = np.zeros((self.level_points, w.shape[1]))
            full[index.numpy()] = w
            w = full
        exps = column_exponents(w, "sum")
        w = w / 2.0 ** exps
        lay = feats.layout
        k = w.shape[1]
        r_total, _, _ = self.evaluator.group_shape(lay, k)
        groups = -(-k // r_total)
        call = self.calls
        self.calls += 1
        masks = uniform_masks(self.prg, f"M/{call}", (groups, lay.slots), self.params.mask_bits)
        b = int(feats.exps.shape[0])
        outputs = output_masks(need, basis.num_basis, int(u.shape[1]), b)
        if outputs.shape[0] != k:
            raise RuntimeError("weight matrix and output masks disagree")
        if self.version == 1:
            blobs = self.evaluator.products(feats, w, masks)
            self.to_fixed.send("cross", {"call": call}, **pack_bytes(blobs))
            slots = opened_slots(outputs, lay.bb, r_total, lay.slots)
            _, m, reply = self.to_fixed.recv("reply")
            vals = reply["values"].numpy()
            if int(m.get("call", -1)) != call or vals.shape != slots.shape or not np.isfinite(vals).all():
                raise PeerError("malformed reply from the fixed party")
            y = np.full((k, b), np.nan)
            y[outputs] = vals - masks.reshape(-1)[slots]
        else:
            count = r_total * lay.bb
            mapped = masks[:, :count].reshape(groups * r_total, lay.bb)[:k, :b]  # mask of y[k, b]
            y, blobs = self._cross_v2(call, feats, w, masks, mapped, outputs)
        y = y * 2.0 ** exps[:, None] * 2.0 ** feats.exps[None, :]
        y = torch.from_numpy(y)
        a = u.shape[1]
        p, ca = basis.num_basis, len(range(a)[need.cross_cols])
        cross = torch.full((p, a, b), float("nan"), dtype=torch.float64)
        total = torch.full((a, b), float("nan"), dtype=torch.float64)
        cross[:, need.cross_cols] = y[:p * ca].reshape(p, ca, b)
        total[need.total_cols] = y[p * ca:]
        self.stats.calls += 1
        self.stats.seconds += time.perf_counter() - t0
        self.per_call.append({
            "call": call, "points": int(u.shape[0]), "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - c0, "ciphertexts_sent": len(blobs),
            "bytes_sent": self.to_fixed.traffic.sent - sent0, "bytes_received": self.to_fixed.traffic.received - recv0,
        })
        return CrossResult(cross, total)

    def _cross_v2(self, call: int, feats, w: np.ndarray, masks: np.ndarray, mapped: np.ndarray,
                  outputs: np.ndarray):
        """FHE-v2: party 1 evaluates rows [0, n1) on [[V_1]], party 2 rows [n1, n) on [[W_2]]; party 2
        unmasks only the ``outputs`` entries (the rest stay hidden by its masks R)."""
        n1, k, b = feats.layout.num_points, w.shape[1], mapped.shape[1]
        w2 = w[n1:]
        chunks = Layout(w2.shape[0], k, self.params.slots).chunks
        if chunks > MAX_V2_CIPHERTEXTS:
            raise InputError(f"FHE-v2 would send {chunks} encrypted weight ciphertexts per iteration ({k} outputs x "
                             f"{w2.shape[0]} points); use --protocol fhe-v1, fewer points or fewer parameters")
        blobs = self.evaluator.products(feats, w[:n1], masks)
        enc_w2 = self.own.encrypt_packed(w2, self.params.w_scale_bits)
        self.to_fixed.send("cross", {"call": call, "outputs": k}, **pack_bytes(blobs), **pack_bytes(enc_w2, "w2"))
        _, m, reply = self.to_fixed.recv("reply")
        vals = reply["values"].numpy()
        if int(m.get("call", -1)) != call or vals.shape != (int(outputs.sum()),) or not np.isfinite(vals).all():
            raise PeerError("malformed reply from the fixed party")
        theirs = self.own.decrypt(unpack_bytes(reply, b, "y2"), k)  # (b, k): y_2 + R
        if theirs.shape != (b, k) or not np.isfinite(theirs).all():
            raise PeerError("malformed encrypted reply from the fixed party")
        y = np.full((k, b), np.nan)
        y[outputs] = vals - mapped[outputs] + theirs.T[outputs]
        return y, blobs + enc_w2

    def close(self) -> None:
        self.evaluator.seal.close()
        if self.own is not None:
            self.own.seal.close()
