"""Write the fixed validation and test prompt sets of bench/quality.py under bench/data/.

- ``quality_validation_prompts.jsonl``: 32 of the original 300 rows of the embedded set: the ones
  the default run held out of it (``data.heldout_size=32``, ``data.split_seed=0``) when this file
  was written. They have since been removed from the embedded set (default.jsonl, large.jsonl), so
  no run trains on them. Recipes were compared on these before, so they can only serve to choose.
  (``validation_rows`` reads them from the embedded set as it was then; the file is not rebuilt.)
- ``quality_test_prompts.jsonl``: 32 prompts drawn afresh from the same three sources in the same
  shares (16 conversation openers, 10 arithmetic questions, 6 documentation passages), none of
  them in the embedded set, in the maths tasks or in the validation set. Nothing is chosen on
  these; they only report.

Usage (the two data packages are only needed here, not by distill):
    pip install --no-deps chatterbot-corpus==1.3.3 mathematics_dataset==1.0.1 absl-py six
    python tools/build_quality_splits.py
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "src"))

import build_default_prompts as build  # noqa: E402

from distill.core.data import read_prompts, split_prompts  # noqa: E402

EMBEDDED = ROOT / "src/distill/prompts/default.jsonl"
MATHS_TASKS = ROOT / "src/distill/prompts/maths_tasks.jsonl"
OUT = ROOT / "bench/data"
TEST_SEED = 20261206  # any seed other than the embedded set's


def _texts(path: Path) -> set[str]:
    return {json.loads(line)["prompt"].strip().lower() for line in path.read_text().splitlines() if line}


def validation_rows() -> list[dict]:
    _, held = split_prompts(read_prompts(EMBEDDED), heldout_size=32, seed=0)
    ids = {p.id for p in held}
    rows = [json.loads(line) for line in EMBEDDED.read_text().splitlines() if line]
    return [r for r in rows if r["id"] in ids]


def test_rows(taken: set[str]) -> list[dict]:
    rng = random.Random(TEST_SEED)
    fresh = lambda rows: [r for r in rows if r["prompt"].strip().lower() not in taken]  # noqa: E731
    chat = fresh(build.chatterbot_prompts(10_000, rng))[:16]
    build.SEED = TEST_SEED  # maths_prompts seeds its generators with build.SEED
    maths = fresh(build.maths_prompts(60, rng))[:10]
    docs = fresh(build.pydoc_prompts(10_000, rng))[:6]
    rows = chat + maths + docs
    if len(rows) != 32:
        raise SystemExit(f"only {len(rows)} fresh prompts")
    return [{"id": f"qt{i:03d}", **r} for i, r in enumerate(rows)]


def main() -> None:
    val = validation_rows()
    taken = _texts(EMBEDDED) | _texts(MATHS_TASKS)
    test = test_rows(taken)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, rows in (("quality_validation_prompts", val), ("quality_test_prompts", test)):
        path = OUT / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"wrote {len(rows)} prompts to {path}")


if __name__ == "__main__":
    main()
