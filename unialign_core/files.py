"""Writing files so that nobody ever reads half of one: the one atomic-write rule of the library and the trainer.

    write_atomic("model.safetensors", lambda tmp: save_file(tensors, tmp))

The content goes to a hidden temporary beside the target (`.<name>.<pid>.tmp`), is flushed to disk, gets ordinary
permissions and is renamed over the target. On any error the temporary is removed and the previous file stays as it
was; a full disk raises `NoSpaceError`, whose message says so. A process killed while writing (SIGKILL) cannot remove
its temporary: the next write of the same target removes the temporaries of processes that no longer run
(`remove_stale_temporaries`).
"""

import errno
import os
import re
from typing import Callable, List, Optional


class NoSpaceError(OSError):
    """The disk filled up while writing `path`; the temporary is gone and the previous file (if any) is intact."""

    def __init__(self, path: str, previous: bool):
        folder = os.path.dirname(os.path.abspath(path))
        kept = f"the previous file {path} is intact" if previous else f"{path} was not written"
        self.message = f"no space left on {folder} while writing {os.path.basename(path)}; {kept}. Free some space"
        super().__init__(errno.ENOSPC, self.message, path)

    def __str__(self) -> str:
        return self.message


def is_no_space(error: BaseException) -> bool:
    """Whether `error` (or what caused it) is a full disk or an exceeded quota."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left" in str(error) or "os error 28" in str(error):
            return True  # safetensors reports a full disk as a SafetensorError with the OS message
        error = error.__cause__ or error.__context__
    return False


def new_file_mode() -> int:
    """The permissions a plain new file gets here (0o666 less the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def temporary_path(path: str) -> str:
    """Where this process writes `path` before renaming it into place."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{os.getpid()}.tmp")


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists (another user's process), or we cannot tell: keep its file
    return True


def remove_stale_temporaries(path: str) -> List[str]:
    """Remove the temporaries of `path` left by writers that no longer run (killed mid-write); returns them."""
    folder, name = os.path.split(os.path.abspath(path))
    pattern = re.compile(r"^\." + re.escape(name) + r"\.(\d+)\.tmp$")
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for entry in names:
        m = pattern.match(entry)
        if m and not _running(int(m.group(1))):
            try:
                os.remove(os.path.join(folder, entry))
                removed.append(os.path.join(folder, entry))
            except OSError:
                pass
    return removed


def fsync_dir(folder: str) -> None:
    """Make a rename in `folder` durable (where the OS allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def begin_write(path: str, clean_stale: bool = True) -> str:
    """Start an atomic write of `path`: make its folder, remove the temporaries killed writers left for it (when
    `clean_stale`) and return the temporary to write; then `finish_write` or `discard_write`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if clean_stale:
        remove_stale_temporaries(path)
    return temporary_path(path)


def finish_write(tmp: str, path: str) -> None:
    """Flush the written temporary to disk, give it ordinary permissions and rename it over `path`."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, new_file_mode())  # safetensors creates owner-only files; exports are read by other users
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def discard_write(tmp: str, path: str, error: BaseException) -> Optional[NoSpaceError]:
    """Remove the temporary of a failed write; returns the `NoSpaceError` to raise instead of `error` when the
    disk filled up, else None (raise `error` itself)."""
    try:
        os.remove(tmp)
    except OSError:
        pass
    if isinstance(error, Exception) and not isinstance(error, NoSpaceError) and is_no_space(error):
        return NoSpaceError(path, os.path.exists(path))
    return None


def write_atomic(path: str, write: Callable[[str], None], clean_stale: bool = True) -> str:
    """Write `path` through `write(temporary_path)`; the target is replaced only by a complete, flushed file.

    `clean_stale` first removes the temporaries killed writers left for `path` (it lists the folder: pass False
    for many small files in one folder, such as a feature cache)."""
    path = os.path.abspath(path)
    tmp = begin_write(path, clean_stale)
    try:
        write(tmp)
        finish_write(tmp, path)
    except BaseException as e:
        no_space = discard_write(tmp, path, e)
        if no_space is not None:
            raise no_space from e
        raise
    return path


def write_text_atomic(path: str, text: str) -> str:
    """`write_atomic` for UTF-8 text."""

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return write_atomic(path, write)


def write_bytes_atomic(path: str, data: bytes, clean_stale: bool = True) -> str:
    """`write_atomic` for bytes."""

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    return write_atomic(path, write, clean_stale)
