"""Progress (rate and ETA) and console output shared by the stages.

In a terminal a progress bar is a live rich bar. Anywhere else (a log file, CI, a pipe, or
``TERM=dumb``) it is a plain line now and then: every ``DISTILL_PROGRESS_SECONDS`` seconds (30
unless set), at 25, 50 and 75 % once a bar has run that long, and at its end, each with what is
done, the rate, the time spent and left, and the bar's ``info``; a bar that ends sooner prints one
line. Long lines are not wrapped there. ``NO_COLOR`` turns colour off (rich reads it).
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

console = Console(stderr=True)
if not console.is_terminal:  # a log file or a pipe: a long line stays one line, not wrapped at 80
    console.soft_wrap = True

# Seconds between two plain progress lines of one bar when nothing else prints one (a percent mark).
INTERVAL_ENV = "DISTILL_PROGRESS_SECONDS"
DEFAULT_INTERVAL_S = 30.0
MARKS = (25, 50, 75, 100)  # percent marks: a plain line when a bar first reaches each


class RateColumn(ProgressColumn):
    """Items per second, with the unit the caller names."""

    def __init__(self, unit: str = "it") -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        shown = "?" if not speed else f"{speed:,.1f}"
        return Text(f"{shown} {self.unit}/s", style="progress.data.speed")


def live_bars() -> bool:
    """Whether progress is drawn as live bars: stderr is a terminal that is not ``TERM=dumb``."""
    return console.is_terminal and not console.is_dumb_terminal


def progress_bar(unit: str = "it", *extra: ProgressColumn, disable: bool = False) -> Progress | PlainProgress:
    """A bar showing done/total, percent, rate in ``unit``/s, elapsed and ETA; outside a terminal
    the same as plain lines (``PlainProgress``, which leaves out the ``extra`` columns)."""
    if not live_bars():
        return PlainProgress(unit, disable=disable)
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        *extra,
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
        disable=disable,
    )


def progress_interval() -> float:
    """Seconds between plain progress lines: ``$DISTILL_PROGRESS_SECONDS``, else 30."""
    value = os.environ.get(INTERVAL_ENV, "")
    try:
        return max(float(value), 0.0) if value else DEFAULT_INTERVAL_S
    except ValueError:
        return DEFAULT_INTERVAL_S


@dataclass
class _PlainTask:
    description: str
    total: float | None
    completed: float
    info: str
    started: float  # clock time of add_task
    start_completed: float  # done before this bar began (resumed work): not in the rate
    printed_at: float  # clock time of the last line
    printed_completed: float  # done at the last line
    mark: int  # the highest percent mark reached at the last line (or at the start)


class PlainProgress:
    """Progress as plain lines, for a console that cannot redraw a bar: the part of rich's
    ``Progress`` the stages use (a context manager, ``add_task``, ``update``).

    A task prints a line when it finishes, at its first update ``interval`` seconds or more after
    its last line (or its start), when it first reaches 25, 50 or 75 % once it has run for
    ``interval`` seconds (a bar that ends sooner prints only its end), and when the bar closes with
    progress not yet printed (a stop half-way). Lines are printed from ``update`` alone: nothing
    runs in between.

    Args:
        unit: what the count counts, for the rate (``{unit}/s``).
        disable: print nothing (a process other than the main one).
        interval: seconds between lines; None: ``progress_interval()``.
        clock: seconds, monotonic.
        write: prints one line; None: the console (stderr).
    """

    def __init__(
        self,
        unit: str = "it",
        *,
        disable: bool = False,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        write: Callable[[str], None] | None = None,
    ) -> None:
        self.unit = unit
        self.disable = disable
        self.interval = progress_interval() if interval is None else interval
        self.clock = clock
        self.write = write or _print_line
        self.tasks: list[_PlainTask] = []

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        now = self.clock()
        for task_id, task in enumerate(self.tasks):
            if task.completed != task.printed_completed:
                self._print(task_id, now)

    def add_task(
        self, description: str, total: float | None = 100.0, completed: float = 0, info: str = ""
    ) -> int:
        """A new task, ``completed`` of ``total`` done already; returns its id for ``update``."""
        now = self.clock()
        task = _PlainTask(description, total, completed, info, now, completed, now, completed, 0)
        task.mark = _mark(task)
        self.tasks.append(task)
        return len(self.tasks) - 1

    def update(
        self,
        task_id: int,
        *,
        total: float | None = None,
        advance: float | None = None,
        description: str | None = None,
        info: str | None = None,
    ) -> None:
        """Change a task as rich's ``Progress.update`` does; prints its line when one is due."""
        task = self.tasks[task_id]
        if total is not None:
            task.total = total
        if advance is not None:
            task.completed += advance
        if description is not None:
            task.description = description
        if info is not None:
            task.info = info
        now = self.clock()
        finished = bool(task.total) and task.completed >= task.total
        # a bar that ends within one interval prints only its end; a longer one its marks too
        marked = _mark(task) > task.mark and now - task.started >= self.interval
        if finished or marked or now - task.printed_at >= self.interval:
            self._print(task_id, now)

    def line(self, task_id: int, now: float) -> str:
        """The task's line at clock time ``now``: description, done/total (percent), rate in
        ``unit``/s over this bar's own work, elapsed, ETA, and its info."""
        task = self.tasks[task_id]
        elapsed = now - task.started
        rate = (task.completed - task.start_completed) / elapsed if elapsed > 0 else 0.0
        done = f"{_count(task.completed)}/{_count(task.total)}" if task.total else _count(task.completed)
        if task.total:
            done += f" {self.unit} ({100 * task.completed / task.total:.0f}%)"
        else:
            done += f" {self.unit}"
        left = (task.total - task.completed) / rate if rate > 0 and task.total else None
        parts = [
            f"{task.description}: {done}",
            f"{_rate(rate)} {self.unit}/s",
            f"elapsed {_clock_time(elapsed)}",
            f"eta {'?' if left is None else _clock_time(max(left, 0.0))}",
        ]
        if task.info:
            parts.append(task.info)
        return " · ".join(parts)

    def _print(self, task_id: int, now: float) -> None:
        task = self.tasks[task_id]
        task.printed_at, task.printed_completed, task.mark = now, task.completed, max(task.mark, _mark(task))
        if not self.disable:
            self.write(self.line(task_id, now))


def _mark(task: _PlainTask) -> int:
    """The highest percent mark ``task`` has reached (0: none)."""
    if not task.total:
        return 0
    percent = 100 * task.completed / task.total
    return max((m for m in MARKS if percent >= m), default=0)


def _print_line(line: str) -> None:
    console.print(line, markup=False, highlight=False, soft_wrap=True)


def _count(n: float) -> str:
    return f"{n:,.0f}" if float(n).is_integer() else f"{n:,.1f}"


def _rate(per_s: float) -> str:
    """``per_s`` with three significant figures below 100 (a slow step: 0.025), whole above."""
    if per_s <= 0:
        return "?"
    return f"{per_s:,.0f}" if per_s >= 100 else f"{per_s:.3g}"


def _clock_time(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))
