"""Disk chores of the exporters: check free space first, clean what a killed run left, and
put an existing file into a bundle without a second copy where the file system allows it."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

from runtime.atomic import atomic_path
from runtime.cli import log
from runtime.errors import BundleError

GB = 1e9
MARGIN = 1.02  # 2 % on top of the estimate: GGUF alignment padding and metadata
_PID_FILE = re.compile(r"^\.llm-f16-(\d+)\.gguf$")  # export.llm's f16 intermediate (its write temp: _PID_TEMP)
_PID_TEMP = re.compile(r"^\..+\.(\d+)\.\w+\.tmp$")  # runtime.atomic.atomic_path: .NAME.PID.XXXX.tmp
_PID_STAGING = re.compile(r"^\..+\.export-(\d+)-\w+$")  # export.clip's staging folder: .NAME.export-PID-XXXX


def require_free(folder: Path, needs: Mapping[str, int], hint: str) -> None:
    """Refuse (one line) when ``folder``'s file system has less free space than ``needs`` adds up to.

    Example: ``needs={"f16 intermediate": 13.5e9, "llm-q4_0.gguf": 3.8e9}`` with 10 GB free raises
    "... needs about 17.6 GB free in DIR (f16 intermediate 13.5 GB + llm-q4_0.gguf 3.8 GB) but 10.0 GB is free".
    """
    total = int(sum(needs.values()) * MARGIN)
    free = shutil.disk_usage(_existing(folder)).free
    if free < total:
        parts = " + ".join(f"{name} {size / GB:.1f} GB" for name, size in needs.items())
        raise BundleError(
            f"this export needs about {total / GB:.1f} GB free in {folder} ({parts}) but "
            f"{free / GB:.1f} GB is free; {hint}"
        )


def _existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def pid_alive(pid: int) -> bool:
    """True when a process ``pid`` exists (ours or another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(folder: Path) -> int:
    """Delete what killed exports left in ``folder`` — ``.llm-f16-<pid>.gguf`` intermediates,
    atomic-write temporaries ``.NAME.<pid>.XXXX.tmp`` and staging folders ``.NAME.export-<pid>-XXXX``
    — whose process is gone; says what it removed, returns the bytes freed."""
    freed = 0
    if not folder.is_dir():
        return 0
    for path in sorted(folder.iterdir()):
        match = _PID_FILE.match(path.name) or _PID_TEMP.match(path.name) or _PID_STAGING.match(path.name)
        if not match or int(match.group(1)) == os.getpid() or pid_alive(int(match.group(1))):
            continue
        freed += remove_path(path, f"left by a killed export (process {match.group(1)})")
    return freed


def remove_path(path: Path, why: str) -> int:
    """Delete a file or a folder tree, logging ``removed NAME (SIZE) WHY``; the bytes freed."""
    size = tree_size(path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    log(f"  removed {path.name} ({size / GB:.2f} GB) {why}")
    return size


def tree_size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def link_or_copy(src: Path, dst: Path) -> str:
    """Put ``src`` at ``dst``: a hard link (no space, survives moving the bundle), else an atomic
    copy after a free-space check. Returns ``"linked"`` or ``"copied"``."""
    if dst.exists() and os.path.samefile(src, dst):
        return "linked"
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link.tmp")  # a name clean_stale knows after a kill -9
    try:
        os.link(src, tmp)
        os.replace(tmp, dst)
        return "linked"
    except OSError:
        tmp.unlink(missing_ok=True)
    require_free(dst.parent, {dst.name: src.stat().st_size}, "or put the GGUF on the bundle's disk")
    log(f"  copying {src} into the bundle (a hard link is not possible across file systems)")
    with atomic_path(dst) as staged:
        shutil.copyfile(src, staged)
    return "copied"
