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

from ..errors import InputError
from ..net.channel import PeerError
from ..net.pki import make_pki


def _spawn(args: list[str], startup_timeout: float) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "privreg.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
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
    why = [ln for ln in (proc.stderr.read() if proc.stderr else "").splitlines() if ln.strip()]
    if proc.stderr:
        proc.stderr.close()
    if why and ": error: " in why[-1]:  # the spawned party refused (e.g. its plan's reveal limit): say why
        raise InputError(why[-1].split(": error: ", 1)[1])
    raise PeerError(f"{args[0]} {args[1] if len(args) > 1 else ''} process did not start")


def _stop(procs: list[subprocess.Popen], grace: float = 5.0) -> None:
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        for stream in (p.stdout, p.stderr):
            if stream:
                stream.close()


@contextmanager
def local_parties(fixed_path: str, timeout: float = 120.0, pki: str | None = None, dealer: bool = True,
                  cfg=None, protocol: str = "mpc", reveal_limit: float | None = None) -> Iterator[dict]:
    """Spawn party 2 (and the dealer, for MPC) on localhost, each serving one session; yields their
    addresses and the PKI directory. Party 2 is given the same plan (``cfg``, ``protocol``) on its
    command line, as its operator would state it, and ``reveal_limit`` (its default when None)."""
    import json

    from .session import config_to_dict

    plan_args = ["--protocol", protocol]
    if cfg is not None:
        plan_args += ["--config-json", json.dumps(config_to_dict(cfg))]
    if reveal_limit is not None:
        plan_args += ["--reveal-limit", repr(float(reveal_limit))]
    with tempfile.TemporaryDirectory(prefix="privreg-pki-") as td:
        pki_dir = pki or str(make_pki(td))
        procs: list[subprocess.Popen] = []
        try:
            extra, addr = [], None
            if dealer:
                proc, dport = _spawn(["dealer", "--listen", "127.0.0.1:0", "--pki", pki_dir, "--timeout", str(timeout),
                                      "--once"],
                                     30.0)
                procs.append(proc)
                addr = f"127.0.0.1:{dport}"
                extra = ["--dealer", addr]
            fixed, fport = _spawn(["party", "fixed", fixed_path, "--listen", "127.0.0.1:0", *extra, *plan_args,
                                   "--pki", pki_dir, "--timeout", str(timeout), "--once", "--ledger", "none"], 60.0)
            procs.append(fixed)
            yield {"fixed": f"127.0.0.1:{fport}", "dealer": addr, "pki": pki_dir, "processes": procs}
        finally:
            _stop(procs)
