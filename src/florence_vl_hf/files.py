"""Atomic writes of files and folders: a reader sees the old one or the whole new one, never a partial write."""

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

NAME_MAX = 255  # bytes in one file name on Linux, macOS and Windows file systems
_RANDOM_TAIL = len("-4294967295-0123abcd.tmp")  # what callers append to a sibling prefix: a pid, a random part


def sibling_prefix(target, kind: str) -> str:
    """`.NAME.KIND-`: the prefix of a hidden temporary sibling of `target` (staging, retired, .tmp files). NAME is
    shortened with a hash where a valid 255-byte name of `target` would make the sibling's name too long; the choice
    does not depend on what follows, so every run derives the same prefix for the same target and kind."""
    name = Path(target).name
    if len(os.fsencode(f".{name}.{kind}-")) + _RANDOM_TAIL > NAME_MAX:
        name = f"{name[:40]}~{hashlib.sha256(os.fsencode(name)).hexdigest()[:12]}"
    return f".{name}.{kind}-"


def write_text_atomic(path, text: str) -> None:
    """Write `text` to a temporary file next to `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=sibling_prefix(path, "write"), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def replace_dir(new, target) -> None:
    """Rename the folder `new` to `target`. An existing `target` is first renamed aside, put back if the rename fails,
    and deleted only once `new` is in place: a reader sees the old folder or the whole new one."""
    new, target = Path(new), Path(target)
    if not target.exists():
        os.replace(new, target)
        return
    retired = Path(tempfile.mkdtemp(prefix=sibling_prefix(target, "old"), dir=target.parent))
    os.replace(target, retired / target.name)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(retired / target.name, target)
        shutil.rmtree(retired, ignore_errors=True)
        raise
    shutil.rmtree(retired, ignore_errors=True)
