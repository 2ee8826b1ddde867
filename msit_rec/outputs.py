"""Writing command outputs without ever destroying what they replace until the new output is complete.

Every writing command builds its output in a temporary sibling (`.NAME.tmp-…` next to `NAME`) and swaps it
into place only when it is complete: on failure the previous output is untouched and the temporary one is
removed. A directory is replaced only when it is empty or holds nothing but what the command itself writes
(`entries`), so `--out .` or `--out ~/logs --overwrite` can never delete a user's files. Sources and outputs
may not overlap (after resolving symlinks), whatever the flags.

Imports only the standard library and `msit_rec.errors`: `pipelines` uses it too.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from msit_rec.errors import DataError

TMP_TAG = ".tmp-"  # a hidden sibling being written
OLD_TAG = ".old-"  # a hidden sibling being replaced


def check_no_overlap(source: str | Path, out: str | Path, source_flag: str = "--source", out_flag: str = "--out") -> None:
    """Refuse an output equal to, inside, or a parent of the source (symlinks resolved)."""
    src, dst = Path(source).resolve(), Path(out).resolve()
    if src == dst or src in dst.parents or dst in src.parents:
        raise DataError(
            f"{out_flag} {out} overlaps {source_flag} {source} (resolved: {dst} vs {src}); "
            f"the output must be outside the input and must not contain it"
        )


def sibling(path: Path, tag: str) -> Path:
    """A hidden unique name next to `path` (same directory, so a rename onto `path` is atomic)."""
    return path.parent / f".{path.name}{tag}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _foreign_entries(out_dir: Path, entries: Iterable[str]) -> list[str]:
    patterns = list(entries)
    return sorted(e.name for e in out_dir.iterdir() if not any(fnmatch.fnmatch(e.name, p) for p in patterns))


def check_replaceable_dir(out_dir: str | Path, overwrite: bool, entries: Iterable[str], flag: str = "--out") -> None:
    """Raise unless `out_dir` is absent, empty, or (with `overwrite`) holds only `entries` (glob patterns)."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise DataError(f"{flag} {out_dir}: exists and is not a directory")
    if os.path.ismount(out_dir):  # cannot be renamed: the swap at the end would fail after all the work
        raise DataError(f"{flag} {out_dir}: is a mount point; give a directory inside it")
    if not any(out_dir.iterdir()):
        return
    foreign = _foreign_entries(out_dir, entries)
    if foreign:
        raise DataError(
            f"{flag} {out_dir}: holds {foreign[:3]}, which this command did not write; refusing to replace it "
            f"(choose an empty or new directory)"
        )
    if not overwrite:
        raise DataError(f"{flag} {out_dir}: holds an earlier output; pass --overwrite to replace it")


@contextmanager
def staged_dir(out_dir: str | Path, overwrite: bool, entries: Iterable[str], flag: str = "--out") -> Iterator[Path]:
    """Yield a fresh temporary sibling of `out_dir` to write into; on success it replaces `out_dir` whole.

    The check runs first, so a refused output costs nothing. On an exception the temporary directory is
    removed and `out_dir` is left as it was. The swap is two renames in the same parent directory.
    """
    out_dir = Path(out_dir)
    entries = list(entries)
    check_replaceable_dir(out_dir, overwrite, entries, flag)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling(out_dir, TMP_TAG)
    tmp.mkdir()
    try:
        yield tmp
        check_replaceable_dir(out_dir, overwrite, entries, flag)  # nothing foreign appeared meanwhile
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(new: Path, target: Path) -> None:
    """Move the complete directory `new` to `target`; a previous `target` is removed only after the move."""
    old = None
    if target.exists():
        old = sibling(target, OLD_TAG)
        target.rename(old)
    try:
        new.rename(target)
    except BaseException:
        if old is not None:
            old.rename(target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_replaceable_file(out_path: str | Path, overwrite: bool, flag: str = "--out") -> None:
    out_path = Path(out_path)
    if out_path.is_dir():
        raise DataError(f"{flag} {out_path}: is a directory; expected a file path")
    if out_path.exists() and not overwrite:
        raise DataError(f"{flag} {out_path}: exists; pass --overwrite to replace it")


@contextmanager
def staged_file(out_path: str | Path, overwrite: bool, flag: str = "--out") -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success it atomically replaces `out_path` (os.replace)."""
    out_path = Path(out_path)
    check_replaceable_file(out_path, overwrite, flag)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling(out_path, TMP_TAG)
    tmp = tmp.with_name(tmp.name + out_path.suffix)  # the same suffix: writers choose the format by it
    try:
        yield tmp
        check_replaceable_file(out_path, overwrite, flag)
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
