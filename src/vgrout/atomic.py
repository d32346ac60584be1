"""Atomic file writes: every artifact is written to a temp file beside it, then renamed.

A process killed at any instant leaves either the old file or the new one, never a torn
one. Torch-free, so the environment package can use it too.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what a plain open() would create (mkstemp makes 0600)


@contextmanager
def atomic_path(dest: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path in dest's folder; when the block succeeds it replaces `dest`.

    Invariant: `dest` is never observed half-written; on an exception the temp file is
    removed and `dest` is untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".tmp_{dest.name}.", suffix=suffix)
    os.close(fd)
    os.chmod(tmp, FILE_MODE)
    try:
        yield Path(tmp)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(dest: str | Path, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(dest: str | Path, text: str) -> None:
    """Write `text` verbatim (no newline translation, so CSV "\r\n" survives) as UTF-8."""
    with atomic_path(dest) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)


def write_json_atomic(dest: str | Path, obj: object, *, indent: int | None = 2) -> None:
    write_text_atomic(dest, json.dumps(obj, indent=indent, default=str) + "\n")


@contextmanager
def staging_dir(dest: str | Path) -> Iterator[Path]:
    """Yield a fresh world-readable folder beside `dest` (same filesystem, so renaming it into
    place is atomic) in which to assemble a built artifact (a model folder).

    Invariant: whatever the block does or raises, the staging folder is gone afterwards; the
    block itself renames it into place (or not), so `dest` is either untouched or complete.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    os.chmod(tmp, 0o755)  # mkdtemp is private; a built model is a shared artifact
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
