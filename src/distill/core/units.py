"""Durations (``20m``, ``1h30m``), counts (``60M``) and "did you mean" hints for config values."""

from __future__ import annotations

import difflib
import re


def nearest(word: str, choices) -> str:
    """' (did you mean X?)' for the closest of ``choices`` to a misspelt ``word``, else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*$")


def duration_seconds(text: str | float | int) -> float:
    """Seconds in ``90``, ``90s``, ``10m``, ``1h30m`` or ``1.5h``.

    Raises:
        ValueError: any other form.
    """
    if isinstance(text, int | float):
        return float(text)
    m = _DURATION.match(str(text))
    if not m or not any(m.groups()):
        raise ValueError(f"{text!r} is not a duration; write e.g. 90s, 10m or 1h30m")
    h, mins, secs = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mins * 60 + secs


def positive_duration(v: str | None) -> str | None:
    """``v`` unchanged when it is None or a positive duration (``duration_seconds``); else ValueError."""
    if v is not None and duration_seconds(v) <= 0:
        raise ValueError("must be a positive duration, e.g. 10m")
    return v


def parse_count(text: str | int) -> int | None:
    """``70M`` -> 70_000_000 (also ``1.5B``, ``500k``, ``12345``); None when not a count."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbB]?)\s*", str(text))
    if not m:
        return None
    scale = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}[m.group(2).lower()]
    value = int(float(m.group(1)) * scale)
    return value if value > 0 else None
