"""Atomic writes: build a file or a directory under a temporary name beside it, then rename it into place.

A reader sees either the previous version or the complete new one, never a half-written one; if
the writing raises, the temporary is removed and the previous version is untouched.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """Yield a text file (UTF-8) open for writing beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | Path, marker: str):
    """Yield a temporary directory beside `path`; on success it replaces `path` in one rename.

    `marker` names a file every directory of this kind holds: an existing `path` is replaced only
    when it is empty or holds `marker` (an earlier write of the same kind), so nothing else is
    ever deleted. It is moved aside first and deleted only after the new one is in place.
    """
    path = Path(path)
    if path.exists() and not (path.is_dir() and (not any(path.iterdir()) or (path / marker).is_file())):
        raise FileExistsError(f"{path} exists and is not an earlier output of this kind (no {marker} in it): "
                              f"refusing to replace it; choose another path or remove it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(path, old)
    os.rename(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
