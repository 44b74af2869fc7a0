"""Where a command's output goes: distill's own lines, progress, warnings and errors to the
console (stderr); other libraries' logging, warnings and progress bars to the run folder's
``logs/run.log``.

The libraries that talk while a stage runs are transformers ("Loading weights", "Writing model
shards", the GGUF loader's "Converting and de-quantizing GGUF tensors"), huggingface_hub, httpx
(a line per API request), openai, accelerate, gguf ("Writing the following files") and torch.
Their bars go to run.log as one line each, when they close; a bar that cannot be redirected
(huggingface_hub's download bars) is turned off, and run.log says so.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import tqdm.std
from rich.markup import escape

from distill.core.progress import console

# Loggers that may carry a handler of their own to the console (transformers' library logger
# does, and stops its records there): while a stage runs, their records go to run.log instead.
LIBRARIES = (
    "transformers",
    "huggingface_hub",
    "httpx",
    "httpx2",  # the HTTP client the openai package uses
    "httpcore",
    "httpcore2",
    "openai",
    "accelerate",
    "gguf",
    "torch",
)

_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # src/distill: a warning raised from here is ours
# run.log's own lines (the command, what was turned off, how it ended): to run.log alone, never the
# console, with --verbose too.
_NOTES = logging.getLogger("distill_runlog")
_NOTES.propagate = False
_NOTES.setLevel(logging.INFO)
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _RunLogHandler(logging.FileHandler):
    """Appends to run.log; a write that fails (a full disk) turns it off without a word on the
    console: the stage meets the same fault writing its own files and says so."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        self.setLevel(logging.CRITICAL + 1)


class _ConsoleHandler(logging.Handler):
    """distill's own log records, as plain lines on the console."""

    def emit(self, record: logging.LogRecord) -> None:
        console.print(self.format(record), markup=False, highlight=False, soft_wrap=True)


class _LoggedBar(tqdm.std.tqdm):
    """A third-party tqdm bar that draws nothing and logs one line to run.log when it closes: what
    it counted, how many, in how long."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["file"] = _Discard()
        super().__init__(*args, **kwargs)

    def close(self) -> None:
        if not self.disable:  # closing twice (tqdm's __del__ closes too) logs once
            total = "" if self.total is None else f"/{self.total:,}"
            elapsed = self._time() - self.start_t
            logging.getLogger("tqdm").info(
                "%s: %s%s %s in %.1f s", self.desc or "progress", f"{self.n:,}", total, self.unit, elapsed
            )
        super().close()


class _Discard:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


@contextmanager
def run_output(log_path: Path, *, verbose: bool = False) -> Iterator[Path]:
    """For the time of a stage, append other libraries' output to ``log_path`` (made with its
    folder, a header line first) and keep the console for distill's own lines; restored after.

    ``verbose``: every library's output on the console too, as without this; run.log then gets
    the logging records that reach the root logger.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handler = _RunLogHandler(log_path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT))
    root = logging.getLogger()
    with ExitStack() as undo:
        undo.callback(handler.close)  # last, after every change below is undone
        _add_handler(undo, root, handler)
        _set_level(undo, root, logging.INFO)
        _add_handler(undo, _NOTES, handler)
        _NOTES.info("distill %s (pid %d)", " ".join(sys.argv[1:]), os.getpid())
        if verbose:  # as distill has always done: every library's records on stderr as well
            stream = logging.StreamHandler()
            stream.setFormatter(logging.Formatter("%(message)s"))
            _add_handler(undo, root, stream)
        else:
            _route_libraries(undo)
        try:
            yield log_path
        except BaseException as exc:
            _NOTES.info("ended by %s: %s", type(exc).__name__, str(exc)[:300])
            raise


def _route_libraries(undo: ExitStack) -> None:
    """distill's records to the console; the libraries' records, warnings and bars to run.log."""
    ours = _ConsoleHandler(logging.INFO)
    ours.setFormatter(logging.Formatter("%(message)s"))
    _add_handler(undo, logging.getLogger("distill"), ours)
    for name in LIBRARIES:
        lib = logging.getLogger(name)
        for h in list(lib.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                lib.removeHandler(h)
                undo.callback(lib.addHandler, h)
        if not lib.propagate:
            lib.propagate = True
            undo.callback(setattr, lib, "propagate", False)
    shown = warnings.showwarning
    warnings.showwarning = _show_warning
    undo.callback(setattr, warnings, "showwarning", shown)
    _route_bars(undo)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning raised in distill's code on the console; one raised elsewhere to run.log."""
    if Path(filename).resolve().is_relative_to(_PACKAGE_DIR):
        console.print(f"[yellow]warning:[/yellow] {escape(str(message))}", soft_wrap=True, highlight=False)
        return
    text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
    logging.getLogger("py.warnings").warning("%s", text)


def _route_bars(undo: ExitStack) -> None:
    """transformers' bars (through its tqdm hook) and the GGUF loader's to run.log, a line each;
    huggingface_hub's off."""
    from transformers.utils import logging as hf_logging

    if hasattr(hf_logging, "set_tqdm_hook"):

        def hook(factory, args, kwargs):
            if factory is hf_logging.EmptyTqdm:  # bars turned off (HF_HUB_DISABLE_PROGRESS_BARS) stay off
                return factory(*args, **kwargs)
            return _LoggedBar(*args, **kwargs)

        undo.callback(hf_logging.set_tqdm_hook, hf_logging.set_tqdm_hook(hook))
    elif hf_logging.is_progress_bar_enabled():  # an older transformers: no hook to redirect them
        hf_logging.disable_progress_bar()
        undo.callback(hf_logging.enable_progress_bar)
        _NOTES.info("transformers' progress bars are off (distill --verbose shows them)")
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_loading
    except ImportError:  # transformers without GGUF loading: no bar to route
        gguf_loading = None
    if gguf_loading is not None and hasattr(gguf_loading, "tqdm"):
        undo.callback(setattr, gguf_loading, "tqdm", gguf_loading.tqdm)
        gguf_loading.tqdm = _LoggedBar
    import huggingface_hub.utils as hub_utils

    if not hub_utils.are_progress_bars_disabled():
        hub_utils.disable_progress_bars()
        undo.callback(hub_utils.enable_progress_bars)
        _NOTES.info("huggingface_hub's progress bars (downloads) are off (distill --verbose shows them)")


def _add_handler(undo: ExitStack, logger: logging.Logger, handler: logging.Handler) -> None:
    logger.addHandler(handler)
    undo.callback(logger.removeHandler, handler)


def _set_level(undo: ExitStack, logger: logging.Logger, level: int) -> None:
    undo.callback(logger.setLevel, logger.level)
    logger.setLevel(level)
