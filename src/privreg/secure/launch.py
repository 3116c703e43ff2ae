"""``privreg secure-register``: start party 2 and the dealer as their own processes on localhost,
run party 1 here, and clean up every process whatever happens."""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator

from ..net.channel import PeerError
from ..net.pki import make_pki


def _spawn(args: list[str], startup_timeout: float) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "privreg.cli", *args], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if not sel.select(timeout=0.2):
            if proc.poll() is not None:
                break
            continue
        line = proc.stdout.readline()
        if line.startswith("LISTENING "):
            sel.close()
            return proc, int(line.split()[1])
        if not line and proc.poll() is not None:
            break
    sel.close()
    _stop([proc])
    raise PeerError(f"{args[0]} {args[1] if len(args) > 1 else ''} process did not start")


def _stop(procs: list[subprocess.Popen], grace: float = 5.0) -> None:
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if p.stdout:
            p.stdout.close()


@contextmanager
def local_parties(fixed_path: str, timeout: float = 120.0, pki: str | None = None,
                  dealer: bool = True) -> Iterator[dict]:
    """Spawn party 2 (and the dealer, for MPC) on localhost; yields their addresses and the PKI directory."""
    with tempfile.TemporaryDirectory(prefix="privreg-pki-") as td:
        pki_dir = pki or str(make_pki(td))
        procs: list[subprocess.Popen] = []
        try:
            extra, addr = [], None
            if dealer:
                proc, dport = _spawn(["dealer", "--listen", "127.0.0.1:0", "--pki", pki_dir, "--timeout", str(timeout)],
                                     30.0)
                procs.append(proc)
                addr = f"127.0.0.1:{dport}"
                extra = ["--dealer", addr]
            fixed, fport = _spawn(["party", "fixed", fixed_path, "--listen", "127.0.0.1:0", *extra,
                                   "--pki", pki_dir, "--timeout", str(timeout)], 60.0)
            procs.append(fixed)
            yield {"fixed": f"127.0.0.1:{fport}", "dealer": addr, "pki": pki_dir, "processes": procs}
        finally:
            _stop(procs)
