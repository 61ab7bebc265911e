"""Console + ``<run_dir>/<action>.log`` logging for one run.

Python logging (ours, the network's ``ctx.log``, Lightning's and warnings via ``logging.captureWarnings``) goes
through the root logger to the console and, on the launch rank 0, to the run's log file.  Secrets given in
``redact`` are masked in both.  Everything is restored when the run ends, so in-process callers (tests) are not
left with extra handlers.
"""
from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tao_cli.redact import mask

__all__ = ["run_logging", "RedactFilter", "LIGHTNING_LOGGERS"]

LIGHTNING_LOGGERS = ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric", "lightning")
_FILE_FORMAT = "%(asctime)s [%(levelname)s] %(name)s: %(message)s"
#: Modules whose DeprecationWarnings are shown during a run (regex on the module the warning is attributed to).
_OWN_MODULES = r"(tao_cli|networks|__main__)(\.|$)"


class RedactFilter(logging.Filter):
    """Replace each secret by ``*****`` in the formatted message (and drop args so it stays replaced)."""

    def __init__(self, secrets: tuple[str, ...]):
        super().__init__()
        self.secrets = tuple(s for s in secrets if s)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            if any(s in message for s in self.secrets):
                record.msg, record.args = mask(message, self.secrets), None
        return True


class _NoiseFilter(logging.Filter):
    """Drop Lightning messages that advertise services, restate our own configuration choices, or list
    accelerators the run does not use (``GPU available: False``; the run's own device line says what is used)."""

    _PREFIXES = ("💡 Tip:", "Trainer already configured with model summary callbacks", "GPU available:",
                 "TPU available:", "HPU available:", "IPU available:",
                 "Loading `train_dataloader` to estimate number of stepping batches")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).lstrip().startswith(self._PREFIXES)


class _NotFileOnly(logging.Filter):
    """Keep records logged with ``extra={"file_only": True}`` (tracebacks, errors printed elsewhere) off the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "file_only", False)


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).rstrip("\n")  # warnings.formatwarning ends with a newline
        if record.levelno >= logging.WARNING and record.name != "py.warnings":
            return f"{record.levelname}: {text}"
        return text


@contextmanager
def run_logging(log_file: str | Path | None, *, debug: bool = False,
                redact: tuple[str, ...] = ()) -> Iterator[logging.Logger]:
    """Route logs to the console and ``log_file`` (None: console only) for the duration of the block.

    Yields the ``"tao"`` logger.  Lightning's own stream handlers are detached meanwhile so each message is
    printed once.  Records logged with ``extra={"file_only": True}`` go to the file only.
    """
    root = logging.getLogger()
    saved_root = (root.level, list(root.handlers))
    saved_pl = {}
    for name in LIGHTNING_LOGGERS:
        lg = logging.getLogger(name)
        saved_pl[name] = (lg.propagate, list(lg.handlers), lg.level)
        for h in list(lg.handlers):
            lg.removeHandler(h)
        lg.propagate = True
        if lg.level == logging.NOTSET or lg.level > logging.INFO:
            lg.setLevel(logging.INFO)

    redact_filter = RedactFilter(redact)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(_ConsoleFormatter("%(message)s"))
    console.addFilter(redact_filter)
    console.addFilter(_NoiseFilter())
    console.addFilter(_NotFileOnly())
    handlers: list[logging.Handler] = [console]
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, mode="a", encoding="utf-8")
        file_handler.setFormatter(logging.Formatter(_FILE_FORMAT))
        file_handler.addFilter(redact_filter)
        file_handler.addFilter(_NoiseFilter())
        handlers.append(file_handler)
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    logging.captureWarnings(True)
    tao = logging.getLogger("tao")
    try:
        with warnings.catch_warnings():
            # Each distinct warning once per run, wherever it is raised from.
            warnings.simplefilter("once")
            # Known noise that says nothing actionable to a tao user.
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*number of training batches.*is smaller than the logging interval.*")
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
            # Deprecations raised inside third-party code (e.g. pycocotools calling numpy the old way) are not
            # actionable by a tao user; those attributed to our own modules (our call of a deprecated API) show.
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=PendingDeprecationWarning)
            warnings.filterwarnings("once", category=DeprecationWarning, module=_OWN_MODULES)
            yield tao
    finally:
        logging.captureWarnings(False)
        for h in handlers:
            root.removeHandler(h)
            h.flush()
            if h is not console:
                h.close()
        root.setLevel(saved_root[0])
        for h in saved_root[1]:
            root.addHandler(h)
        for name, (propagate, old_handlers, level) in saved_pl.items():
            lg = logging.getLogger(name)
            lg.propagate = propagate
            lg.setLevel(level)
            for h in old_handlers:
                lg.addHandler(h)
