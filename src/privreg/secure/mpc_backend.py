"""Party 1's side of the seam over two-party secret sharing (see :mod:`privreg.mpc.product`)."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from ..basis import Basis
from ..errors import InputError
from ..joint import ALL, BackendStats, Columns, CrossResult, FeatureSpec, JointBackend, Need, dense_columns
from ..mpc.product import LIMBS, IntBasis, column_bits, decode_cross, feature_columns, int_cross, opened_mask, phi_bits
from ..mpc.ring import Prg, encode
from ..net.channel import Channel, PeerError


class MPCBackend(JointBackend):
    """Joint products by secret sharing with party 2 (fixed image) and a dealer (triples)."""

    def __init__(self, to_fixed: Channel, to_dealer: Channel, key: bytes, sampling_mode: str,
                 reveal_gms_indices: bool = False) -> None:
        self.to_fixed, self.to_dealer = to_fixed, to_dealer
        self.prg = Prg(key)
        self.sampling_mode = sampling_mode
        self.reveal = reveal_gms_indices
        self.level = -1
        self.calls = 0
        self.sample_key: tuple[int, int] | None = None
        self.vh: Tensor | None = None
        self.stats = BackendStats()
        self.per_call: list[dict] = []
        self._basis_cache: tuple | None = None

    def start_level(self, level: int, spec: FeatureSpec) -> None:
        meta = {"level": level, "kind": spec.kind, "bins": spec.bins}
        self.to_dealer.send("level", meta)
        self.to_fixed.send("level", meta)
        _, m, arr = self.to_fixed.recv("features")
        self.vh, self.v_bits, self.v_range = arr["vh"], arr["v_bits"], int(m["v_range"])
        self.v_limbs = int(m["v_limbs"])
        if self.vh.shape[1] != feature_columns(spec.kind, spec.bins) or self.v_bits.shape[0] != self.vh.shape[1]:
            raise PeerError("fixed party sent features of the wrong shape")
        self.level = level

    def note_sample(self, level: int, iteration: int, index: Tensor | None) -> None:
        self.sample_key = (level, iteration)

    def cross(self, u: Tensor | Columns, basis: Basis, index: Tensor | None, need: Need = ALL) -> CrossResult:
        u = dense_columns(u)
        if self.vh is None:
            raise RuntimeError("start_level must be called before cross")
        t0, c0 = time.perf_counter(), time.process_time()
        sent0 = self.to_fixed.traffic.sent + self.to_dealer.traffic.sent
        recv0 = self.to_fixed.traffic.received + self.to_dealer.traffic.received
        pb = phi_bits(int(u.shape[0]), self.v_range)
        sample = list(self.sample_key) if index is not None and self.sample_key else None
        key = (self.level, tuple(sample) if sample else None, pb)
        if self._basis_cache is None or self._basis_cache[0] != key:
            phi = IntBasis.from_basis(basis, pb)
            self._basis_cache = (key, phi, phi.digest())
        _, phi, digest = self._basis_cache
        u_bits = column_bits(phi, u, self.v_range)
        u_int = encode(u, u_bits)
        call = self.calls
        self.calls += 1
        meta = {"call": call, "level": self.level, "a": int(u.shape[1]), "phi_bits": pb, "digest": digest,
                "sample": sample}
        arrays = {}
        if index is not None and self.sampling_mode == "gms":
            if not self.reveal:
                raise InputError("GMS indices would be revealed to the fixed party (opt in with --reveal-gms-indices)")
            arrays["index"] = index.to(torch.int32)
        ra = self.prg.ring(f"Ra/{call}", tuple(u_int.shape))
        t1 = self.prg.ring(f"t1/{call}", (LIMBS, phi.num_basis, u.shape[1], self.vh.shape[1]))
        self.to_dealer.send("cross", meta, **arrays)
        self.to_fixed.send("cross", meta, uh=u_int - ra, **arrays)
        vh = self.vh if index is None else self.vh[index]
        local = int_cross(phi, ra, vh)  # overlaps with party 2's work
        _, m, reply = self.to_fixed.recv("reply")
        if int(m.get("call", -1)) != call:
            raise PeerError("fixed party answered a different call")
        b = self.vh.shape[1] // self.v_limbs
        cmask, tmask = need.masks(int(u.shape[1]), b)
        opened = opened_mask(cmask, tmask, local.shape[1], local.shape[0], self.v_limbs)
        z = reply["z"]
        if z.dtype != torch.int64 or tuple(z.shape) != (int(opened.sum()),):
            raise PeerError(f"fixed party sent a reply of shape {tuple(z.shape)}, expected ({int(opened.sum())},)")
        full = torch.zeros_like(local)  # entries not opened stay unknown to party 1 (only its own share)
        full[opened] = z + (t1 + local)[opened]
        cross, total = decode_cross(full, u_bits, self.v_bits, phi, self.v_limbs)
        cross[:, ~cmask] = float("nan")
        total[~tmask] = float("nan")
        self.stats.calls += 1
        self.stats.seconds += time.perf_counter() - t0
        self.per_call.append({
            "call": call, "points": int(u.shape[0]), "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - c0,
            "bytes_sent": self.to_fixed.traffic.sent + self.to_dealer.traffic.sent - sent0,
            "bytes_received": self.to_fixed.traffic.received + self.to_dealer.traffic.received - recv0,
        })
        return CrossResult(cross, total)
