"""Stopping at a safe point: Ctrl-C (SIGINT) or SIGTERM during a stage.

The first signal asks the running stage to stop after the step or batch in progress: training
writes a checkpoint of the step it finished, generation has already made its answers durable.
The stage then raises ``Stopped`` with a one-line message saying how to resume. A second signal
stops at once (``KeyboardInterrupt``); everything finished before it is kept either way.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from distill.core.progress import console

_requested: list[int] = []  # the signal that asked to stop, once one has


class Stopped(Exception):
    """The stage stopped at a safe point because a signal asked it to; ``signum`` says which."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


def requested() -> int | None:
    """The signal number that asked the stage to stop, or None."""
    return _requested[0] if _requested else None


def stop(message: str) -> None:
    """Raise ``Stopped`` with ``message`` (call at a safe point, once ``requested()``)."""
    raise Stopped(message, requested() or signal.SIGINT)


# for stages that write their results only when they finish (shrink, evaluate, export)
WRITES_AT_THE_END = ("stopped before the stage finished; it writes its results only at the end, so nothing "
                     "was half-written: run the same command again")  # fmt: skip


def check(message: str = WRITES_AT_THE_END) -> None:
    """A safe point: stop with ``message`` if a signal asked for it, else nothing."""
    if _requested:
        stop(message)


@contextmanager
def stop_at_safe_points() -> Iterator[None]:
    """While inside, SIGINT and SIGTERM ask for a stop at the next safe point (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signums = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in signums}

    def handler(signum, _frame) -> None:
        if _requested:  # the second: at once
            raise KeyboardInterrupt
        _requested.append(signum)
        console.print(
            f"[yellow]{signal.Signals(signum).name}: stopping after the step in progress[/yellow] "
            "(again to stop at once)"
        )

    for s in signums:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s in signums:
            signal.signal(s, previous[s])
        _requested.clear()
