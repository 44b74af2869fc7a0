"""Rebuild src/distill/prompts/general.txt, the bundled default text for the healing stage.

* chatterbot-corpus 1.3.3 (BSD-3-Clause): every English conversation, one document each (its
  turns on lines of their own), except those whose opening line is a prompt of the embedded
  prompt sets (default.jsonl, large.jsonl) or of a benchmark split (bench/data/*.jsonl), so no
  held-out, validation or test prompt is ever trained on.

  pip install --no-deps chatterbot-corpus==1.3.3
  python tools/build_general_text.py
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent / "src" / "distill" / "prompts"
BENCH = Path(__file__).resolve().parent.parent / "bench" / "data"


def opening(text: str) -> str:
    return " ".join(text.split()).lower().rstrip("?").strip()


def main() -> None:
    files = [ROOT / "default.jsonl", ROOT / "large.jsonl", *sorted(BENCH.glob("*.jsonl"))]
    prompts = {opening(json.loads(ln)["prompt"]) for f in files for ln in f.open() if ln.strip()}
    corpus = resources.files("chatterbot_corpus") / "data" / "english"
    docs, skipped = [], 0
    for f in sorted(corpus.iterdir(), key=lambda p: p.name):
        if not f.name.endswith(".yml"):
            continue
        for conv in yaml.safe_load(f.read_text()).get("conversations", []):
            turns = [" ".join(str(t).split()) for t in conv if str(t).strip()]
            if not turns:
                continue
            if opening(turns[0]) in prompts:
                skipped += 1
                continue
            docs.append("\n".join(turns))
    (ROOT / "general.txt").write_text("\n\n".join(docs) + "\n")
    print(f"wrote {len(docs)} conversations ({skipped} skipped: openings in the prompt set)")


if __name__ == "__main__":
    main()
