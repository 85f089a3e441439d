"""Atomic file and directory replacement.

A checkpoint write either completes or leaves the previous file untouched: data goes to a temporary
file in the destination's directory (same filesystem), is flushed and ``fsync``-ed, and only then
``os.replace``-d over the destination (atomic on POSIX and Windows).  On any error the temporary
file is removed and the exception propagates.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

_TMP_TAG = ".jq-tmp-"


def _current_umask() -> int:
  """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError):
    pass
  return 0o022


def _fsync_dir(directory: str) -> None:
  """Makes a rename durable (best effort; not every OS lets a directory be opened)."""
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
  """Opens a binary file that replaces ``path`` atomically when the ``with`` block succeeds.

  The new file gets the permissions a plain ``open(path, "wb")`` would give (those of the file it
  replaces, or ``0o666 & ~umask``).

  Example:
    >>> with atomic_write("model.safetensors") as f:
    ...   f.write(data)

  Raises:
    Whatever the block raises; then ``path`` is unchanged and no temporary file is left.
  """
  path = os.path.abspath(os.fspath(path))
  directory, base = os.path.split(path)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"cannot write {path}: directory {directory} does not exist")
  try:
    mode = os.stat(path).st_mode & 0o7777
  except FileNotFoundError:
    mode = 0o666 & ~_current_umask()
  fd, tmp = tempfile.mkstemp(prefix=f".{base}{_TMP_TAG}", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise
  _fsync_dir(directory)


def temporary_sibling_dir(path: str | os.PathLike) -> str:
  """A fresh empty directory beside ``path`` (same filesystem) to build a replacement in."""
  path = os.path.abspath(os.fspath(path))
  directory, base = os.path.split(path)
  os.makedirs(directory, exist_ok=True)
  return tempfile.mkdtemp(prefix=f".{base}{_TMP_TAG}", dir=directory)


def replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
  """Moves the finished directory ``src`` to ``dst``, replacing any directory already there.

  POSIX cannot rename a directory over a non-empty one, so an existing ``dst`` is first renamed
  aside, ``src`` renamed into place, and only then the old one deleted; if the second rename fails
  the old directory is put back.  Both renames are atomic, so at every instant either the old or
  the new checkpoint is complete (between them, ``dst`` briefly does not exist).
  """
  src, dst = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(dst))
  if not os.path.lexists(dst):
    os.rename(src, dst)
    _fsync_dir(os.path.dirname(dst))
    return
  if not os.path.isdir(dst) or os.path.islink(dst):
    raise ValueError(f"cannot replace {dst}: it exists and is not a directory")
  old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.jq-old-", dir=os.path.dirname(dst))
  os.rmdir(old)  # only the unique name is wanted
  os.rename(dst, old)
  try:
    os.rename(src, dst)
  except BaseException:
    os.rename(old, dst)
    raise
  _fsync_dir(os.path.dirname(dst))
  shutil.rmtree(old, ignore_errors=True)
