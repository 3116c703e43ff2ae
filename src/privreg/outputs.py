"""Atomic outputs: results appear all at once or not at all, and bad targets are refused up front."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import InputError


def _check_parent(target: Path) -> Path:
    """The existing ancestor of ``target`` must be a writable directory (a missing parent is created later)."""
    parent = target.absolute().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"cannot write {target}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {target}: no permission to write in {probe}")
    return parent


def check_outdir(outdir: str | os.PathLike) -> None:
    """Refuse an output directory that names an existing file or lies under a file or an unwritable folder."""
    out = Path(outdir)
    if out.exists() and not out.is_dir():
        raise InputError(f"output directory {out} exists and is a file")
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise InputError(f"cannot write in output directory {out}: permission denied")
    _check_parent(out)


def check_file_target(path: str | os.PathLike) -> None:
    """Refuse an output file path that names a directory or lies under a file or an unwritable folder."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"output {p} is a directory; give a file name")
    _check_parent(p)


def _mkdir(parent: Path) -> None:
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create {parent}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def atomic_outdir(outdir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory; on success its files are moved into ``outdir``.

    On any exception (SIGINT/SIGTERM included) the temporary directory is removed and ``outdir`` is
    left untouched.
    """
    out = Path(outdir)
    check_outdir(out)
    parent = out.absolute().parent
    _mkdir(parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    try:
        yield tmp
        if not out.exists():
            os.replace(tmp, out)
            return
        for item in tmp.iterdir():
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffixes); on success it replaces ``path``."""
    target = Path(path)
    check_file_target(target)
    parent = target.absolute().parent
    _mkdir(parent)
    suffix = "".join(target.suffixes)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", suffix=suffix, dir=parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
