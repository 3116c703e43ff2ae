"""Arithmetic in Z_2^64 on torch int64 tensors: fixed-point encoding, a CSPRNG, truncation.

* Ring elements are int64 tensors; +, -, * wrap modulo 2^64 (two's complement), which is
  exactly arithmetic in Z_2^64. Products of a uniform element with anything stay uniform.
* Fixed point: x -> round(x * 2^f). The scale f is a power of two chosen per column so that the
  *true* integer result of a product-sum fits in 63 bits; decoding a result that party 1 opens is
  then exact (no truncation error at all).
* Randomness: :class:`Prg` expands a 256-bit key from ``secrets`` with AES-256-CTR (the
  ``cryptography`` package / OpenSSL), one sub-key per label (HMAC-SHA256), and refuses to expand
  any label twice, so no mask or triple is ever reused.
* :func:`truncate_shares`: the standard two-party local truncation of shares (SecureML,
  Mohassel & Zhang 2017) for products that stay shared; exact up to 1 ulp with probability
  1 - 2^(l + 1 - 64) for |x| < 2^l.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from torch import Tensor

RING_BITS = 64
I64 = torch.int64


def new_key() -> bytes:
    """A fresh 256-bit key from the operating system's CSPRNG."""
    return secrets.token_bytes(32)


class Prg:
    """AES-256-CTR expansion of a shared key; each label is expanded at most once."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("PRG keys are 32 bytes")
        self._key = key
        self._used: set[str] = set()

    def ring(self, label: str, shape: tuple[int, ...]) -> Tensor:
        """Uniform elements of Z_2^64 (int64) for ``label``; a label can be used only once."""
        if label in self._used:
            raise RuntimeError(f"PRG label {label!r} reused: masks and triples must be fresh")
        self._used.add(label)
        sub = hmac.new(self._key, label.encode(), hashlib.sha256).digest()
        n = math.prod(shape)
        enc = Cipher(algorithms.AES(sub), modes.CTR(b"\x00" * 16)).encryptor()
        raw = enc.update(bytes(8 * n)) + enc.finalize()
        return torch.from_numpy(np.frombuffer(raw, dtype=np.int64).copy()).reshape(shape)

    @property
    def labels_used(self) -> int:
        return len(self._used)


def random_ring(shape: tuple[int, ...]) -> Tensor:
    """Uniform ring elements straight from the OS CSPRNG."""
    n = math.prod(shape)
    return torch.from_numpy(np.frombuffer(secrets.token_bytes(8 * n), dtype=np.int64).copy()).reshape(shape)


def encode(x: Tensor, frac_bits: Tensor | int) -> Tensor:
    """Fixed point: round(x * 2^frac_bits) as int64 (frac_bits broadcast along the last axis)."""
    scale = torch.pow(2.0, torch.as_tensor(frac_bits, dtype=torch.float64))
    y = torch.round(x.to(torch.float64) * scale)
    if bool((y.abs() >= 2.0**62).any()):
        raise OverflowError("value too large for the chosen fixed-point scale")
    return y.to(I64)


def decode(x: Tensor, frac_bits: Tensor | int) -> Tensor:
    """Inverse of :func:`encode` for an opened (reconstructed) ring element."""
    scale = torch.pow(2.0, torch.as_tensor(frac_bits, dtype=torch.float64))
    return x.to(torch.float64) / scale


def share(x: Tensor) -> tuple[Tensor, Tensor]:
    """Additive shares of a ring tensor: x = s0 + s1 (mod 2^64), s0 uniform."""
    s0 = random_ring(tuple(x.shape))
    return s0, x - s0


def truncate_shares(s0: Tensor, s1: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Divide a shared value by 2^bits locally (SecureML): party 0 shifts its share, party 1
    shifts the negation of its share and negates back. Error at most 1 ulp, except with
    probability about |x| / 2^63."""
    return s0 >> bits, -((-s1) >> bits)
