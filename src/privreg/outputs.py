"""Atomic output directories: results appear all at once or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_outdir(outdir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory; on success its files are moved into ``outdir``.

    On any exception the temporary directory is removed and ``outdir`` is left untouched.
    """
    out = Path(outdir)
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not out.exists():
        os.replace(tmp, out)
        return
    for item in tmp.iterdir():
        os.replace(item, out / item.name)
    shutil.rmtree(tmp, ignore_errors=True)
