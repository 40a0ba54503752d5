"""Atomic file writes: a crash or a full disk never leaves a half-written file at the target."""
import os
import tempfile


def atomic_write(path, write_fn, mode: str = "wb") -> None:
    """Call `write_fn(file)` on a temporary file next to `path`, flush it to disk, then rename
    it to `path` (`os.replace`: atomic on POSIX and Windows).

    On any exception the temporary file is removed and `path` is untouched.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
