"""The answers file (answers.jsonl): one JSON record per answer, appended durably, read back by key."""

from __future__ import annotations

import json
import os
from pathlib import Path

from distill.core.fsio import json_lines


def read_log(path: Path) -> list[dict]:
    """Records of an append-only JSONL log; a torn last line (a killed write) is cut off the file."""
    if not path.is_file():
        return []
    raw = path.read_bytes()
    good_end = raw.rfind(b"\n") + 1
    if good_end < len(raw):
        with path.open("r+b") as f:
            f.truncate(good_end)
    out = []
    for i, line in enumerate(json_lines(raw[:good_end].decode()), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{path}:{i}: corrupt record ({exc.msg}); delete that line to go on"
                ) from None
    return out


def answer_key(prompt_id: str, sample: int = 0) -> str:
    """Key of one answer: the prompt id, with ``#j`` for sample j > 0. ``%`` and ``#`` inside the
    id are escaped (``%25``, ``%23``), so no two (id, sample) pairs share a key: id ``a#1`` sample 0
    is ``a%231``, id ``a`` sample 1 is ``a#1``."""
    escaped = prompt_id.replace("%", "%25").replace("#", "%23")
    return escaped if sample == 0 else f"{escaped}#{sample}"


def read_answers(path: Path) -> dict[str, dict]:
    """Finished answers by ``answer_key`` (of the prompt id and the sample, 0 for a local teacher).
    A torn last line (a killed write) is cut off the file."""
    return {answer_key(rec["id"], rec.get("sample", 0)): rec for rec in read_log(path)}


def up_to_sample(answers: dict[str, dict], last: int) -> dict[str, dict]:
    """The answers whose sample index is at most ``last`` (0: each prompt's first answer)."""
    return {k: a for k, a in answers.items() if a.get("sample", 0) <= last}


def write_records(f, records: list[dict]) -> None:
    """Append JSON lines to an open file and make them durable (flush + fsync) before returning."""
    try:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    except OSError as exc:  # name the file: a write error on an open file does not
        exc.filename = exc.filename or getattr(f, "name", None)
        raise


def append_records(path: Path, records: list[dict]) -> None:
    with path.open("a") as f:
        write_records(f, records)
