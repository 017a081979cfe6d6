"""Output paths: checked before any work, then written atomically (built under a temporary name beside
the output and renamed into place).

`check_output_dir` / `check_output_file` follow transformers' `overwrite_output_dir` convention: a
verb writes into a path that does not exist, an empty directory, or its own earlier output of the
same kind (a directory holding its marker file, a file that starts with its signature);
anything else is refused, naming what is there, unless `overwrite` is given. Never, with or without
`overwrite`: a path that is one of the verb's inputs or contains one, a directory where a file is
wanted or a file where a directory is wanted, and, for an output that replaces a directory, the
current directory or one that contains it.

A reader sees either the previous version or the complete new one, never a half-written one; if
the writing raises, the temporary is removed and the previous version is untouched. Outputs get
the modes the umask gives.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from moa.errors import UsageError


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _check_not_input(path: Path, inputs, replace: bool = True) -> None:
    """Refuse an output that is, or contains, an input or (when it `replace`s a directory) the current directory."""
    for what, other in [("the current directory", Path.cwd())] * replace + [("input", Path(p)) for p in inputs]:
        other = other.resolve()
        if other == path or path in other.parents:
            name = what if what != "input" else f"the input {other}"
            raise UsageError(f"output {path} {'is' if other == path else 'contains'} {name}: refusing to replace it "
                             f"(with or without --overwrite); choose another output path")


def check_output_dir(path: str | Path, marker: str | None, inputs=(), overwrite: bool = False,
                     hint: str = "pass --overwrite to replace it", replace: bool = True) -> Path:
    """The resolved output directory `path`, once it is safe to write (see the module docstring);
    `marker` names a file every directory of this kind holds (None: only a new or empty directory).
    `replace`: the output replaces the directory as a whole; False for a verb that writes files into it,
    which may then be the current directory."""
    path = Path(path).resolve()
    _check_not_input(path, inputs, replace)
    if path.exists() and not path.is_dir():
        raise UsageError(f"output directory {path} is a file: expected a directory (or a path that does not exist)")
    if path.is_dir() and not overwrite and not (marker is not None and (path / marker).is_file()):
        entries = sorted(p.name for p in path.iterdir())
        if entries:
            shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
            what = (f"is not an earlier output of this kind (no {marker} in it)" if marker
                    else "this writes only into a new or empty directory")
            raise UsageError(f"output directory {path} is not empty ({shown}) and {what}: choose another directory "
                             f"or {hint}")
    return path


def check_output_file(path: str | Path, signature: str, inputs=(), overwrite: bool = False) -> Path:
    """The resolved output file `path`, once it is safe to write (see the module docstring); an existing
    file whose first 4096 characters hold `signature` is an earlier output of the same kind."""
    path = Path(path).resolve()
    _check_not_input(path, inputs)
    if path.is_dir():
        raise UsageError(f"output {path} is a directory: expected a file path")
    if path.exists() and not overwrite:
        with open(path, encoding="utf-8", errors="replace") as f:
            start = f.read(4096)
        if signature not in start:
            raise UsageError(f"output {path} exists and is not an earlier output of this kind: choose another "
                             f"path or pass --overwrite to replace it")
    return path


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """Yield a text file (UTF-8) open for writing beside `path`; on success it replaces `path` in one rename."""
    path = Path(path).resolve()
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
def atomic_directory(path: str | Path, marker: str, overwrite: bool = False):
    """Yield a temporary directory beside `path`; on success it replaces `path` in one rename.

    `path` is checked by `check_output_dir(path, marker, overwrite=overwrite)`, so without `overwrite`
    only an empty directory or an earlier write of the same kind is ever replaced. It is moved aside
    first and deleted only after the new one is in place.
    """
    path = check_output_dir(path, marker, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())
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
