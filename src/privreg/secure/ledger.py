"""Party 2's persistent account of what it has opened, per fixed image and per peer certificate.

A per-session budget alone does not help once party 2 serves many sessions: reconnecting would
start a fresh one. The ledger (a JSON file, 0600, updated under an exclusive lock and replaced
atomically) holds, for each (fixed image digest, peer certificate fingerprint), the number of values
opened so far. A session *reserves* its plan's whole budget before any image-derived value moves
(so a crash or a dropped connection still counts the worst case) and *settles* to what it really
opened when it ends cleanly.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from ..image import Image
from .plan import check_limit


def image_digest(image: Image) -> str:
    """SHA-256 of the fixed image's voxels and geometry (the ledger's key, never sent anywhere)."""
    h = hashlib.sha256(np.ascontiguousarray(image.data.detach().cpu().numpy()).tobytes())
    g = image.grid
    h.update(repr((g.size, g.spacing, g.origin, g.direction)).encode())
    return h.hexdigest()


def default_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "privreg" / "ledger.json"


class Ledger:
    """Values opened per (image, peer); ``path=None`` keeps the account in memory (one process)."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self._memory: dict = {}

    @contextlib.contextmanager
    def _locked(self):
        if self.path is None:
            yield self._memory
            return
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(str(self.path) + ".lock", "a+") as lock:
            os.chmod(lock.name, 0o600)
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                data = json.loads(self.path.read_text()) if self.path.exists() else {}
            except (OSError, ValueError):
                raise OSError(f"the reveal ledger {self.path} is unreadable; fix or remove it") from None
            yield data
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".ledger-")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f, indent=1, sort_keys=True)
                os.chmod(tmp, 0o600)
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                raise

    def used(self, image: str, peer: str) -> int:
        with self._locked() as data:
            return int(data.get(image, {}).get(peer, 0))

    def reserve(self, image: str, peer: str, values: int, voxels: int, fraction: float) -> int:
        """Add ``values`` to the account if the total stays within ``fraction`` x ``voxels``; returns
        what was used before. Raises :class:`~privreg.secure.plan.PlanMismatch` otherwise."""
        with self._locked() as data:
            before = int(data.get(image, {}).get(peer, 0))
            check_limit(before + values, voxels, fraction)
            data.setdefault(image, {})[peer] = before + values
            return before

    def settle(self, image: str, peer: str, reserved: int, opened: int) -> None:
        """Give back the part of a reservation that the session did not open."""
        with self._locked() as data:
            cur = int(data.get(image, {}).get(peer, 0))
            data.setdefault(image, {})[peer] = max(0, cur - max(0, reserved - opened))
