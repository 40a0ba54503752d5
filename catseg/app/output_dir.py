"""Output folders: created up front, before any model is built, with a one-line error."""
import tempfile
from pathlib import Path
from typing import Union

from ..errors import OutputError


def make_output_dir(path: Union[str, Path]) -> Path:
    """Create folder `path` (with its parents) and check that a file can be written in it.

    Raises OutputError naming the folder and the reason when it cannot be created or written.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise OutputError(f"cannot write to output folder {path}: {e.strerror or e}") from None
    return path
