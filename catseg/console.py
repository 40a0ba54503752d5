"""What a catseg run prints: the dependency warnings silenced (here and only here, each with
its reason), console logging without colours when redirected, and log-file-only records.

`silence_dependency_warnings()` runs on `import catseg`. Every filter below matches one
warning we understand and that does not apply to catseg; anything else still shows.

Records logged with `extra=FILE_ONLY` (the model printout, the environment dump, the full
config) go to OUTPUT_DIR/log.txt but not to the console (`setup_logging`).
"""
import logging
import sys
import warnings
from typing import Callable, Optional, TypeVar

from .errors import report_errors

T = TypeVar("T")

FILE_ONLY = {"file_only": True}  # logging `extra`: write the record to the log file only

LOGGERS = ("detectron2", "fvcore", "catseg")


def silence_dependency_warnings() -> None:
    """Install the warning filters described above (idempotent)."""
    # torch >= 2.10 deprecates torch.jit.script; open_clip and timm still script small helper
    # functions at import time. We never script or export anything.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    # detectron2's Swin (our Swin-B guidance backbone) calls torch.meshgrid without `indexing`;
    # its ij default is what Swin's relative position index was written for.
    warnings.filterwarnings("ignore", message=r"torch\.meshgrid: in an upcoming release", category=UserWarning)
    # detectron2's Swin / ViT modules import timm.models.layers (moved to timm.layers); same code.
    warnings.filterwarnings("ignore", message=r"Importing from timm\.models\.layers is deprecated",
                            category=FutureWarning)
    # open_clip says "No pretrained weights loaded ... initialized randomly" when catseg builds
    # CLIP without an open_clip tag: on purpose, since the weights then come from a checkpoint
    # (MODEL.WEIGHTS, CLIP_WEIGHTS path) or are seeded-random (CLIP_WEIGHTS "random").
    root = logging.getLogger()
    if not any(isinstance(f, _OpenClipRandomInit) for f in root.filters):
        root.addFilter(_OpenClipRandomInit())


class _OpenClipRandomInit(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded" record (logged on the root logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded for model")


class _ConsoleFilter(logging.Filter):
    """Drops records logged with `extra=FILE_ONLY`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "file_only", False)


def setup_logging(output_dir: Optional[str], rank: int = 0) -> logging.Logger:
    """detectron2's console + OUTPUT_DIR/log.txt logging for the detectron2, fvcore and catseg
    loggers; colours only on a terminal; FILE_ONLY records kept off the console. Returns the
    detectron2 logger."""
    from detectron2.utils.logger import setup_logger

    color = sys.stdout.isatty()
    catseg_logger = logging.getLogger("catseg")
    for handler in [h for h in catseg_logger.handlers if isinstance(h, _CliHandler)]:
        catseg_logger.removeHandler(handler)  # detectron2's handlers replace the plain one
    for name in LOGGERS:
        logger = setup_logger(output_dir, distributed_rank=rank, name=name, color=color,
                              abbrev_name="d2" if name == "detectron2" else name)
        for handler in logger.handlers:
            # (the log file's is a stream too)
            is_console = getattr(handler, "stream", None) in (sys.stdout, sys.stderr)
            if is_console and not any(isinstance(f, _ConsoleFilter) for f in handler.filters):
                handler.addFilter(_ConsoleFilter())
    return logging.getLogger("detectron2")


def setup_cli_logging() -> None:
    """catseg's own log lines (e.g. the device) as plain lines on stderr, for the demo commands."""
    logger = logging.getLogger("catseg")
    if not logger.handlers:
        handler = _CliHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


class _CliHandler(logging.StreamHandler):
    """The plain stderr handler of `setup_cli_logging`."""


def write_line(text: str) -> None:
    """`text` and its newline to stderr in one write. Processes that share stderr (the ranks
    of a launch) then never run their lines together: `print` and `tqdm.write` write the
    newline separately."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def run_command(func: Callable[[], T], debug: bool = False) -> T:
    """The body of a command line (catseg-demo, catseg-label): console logging, each warning
    printed as one `WARNING: ...` line every time, and a CatsegError as one `error: ...` line
    with exit status 2 (`report_errors`)."""
    setup_cli_logging()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        silence_dependency_warnings()
        warnings.showwarning = lambda message, *_, **__: print(f"WARNING: {message}", file=sys.stderr)
        return report_errors(func, debug=debug)
