"""Rebuild src/distill/prompts/default.jsonl, the embedded default prompt set.

Sources, all offline and redistributable (see src/distill/prompts/SOURCES.md):
  * chatterbot-corpus 1.3.3 (BSD-3-Clause): the opening line of English conversations.
  * DeepMind mathematics_dataset 1.0.1 (Apache-2.0): arithmetic questions with answers.
  * CPython's pydoc_data.topics (PSF-2.0): passages of the Python reference to summarise.

Usage (the two data packages are only needed here, not by distill):
    pip install --no-deps chatterbot-corpus==1.3.3 mathematics_dataset==1.0.1 absl-py six
    python tools/build_default_prompts.py
"""

from __future__ import annotations

import json
import random
import re
import sys
from importlib import resources
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parents[1] / "src/distill/prompts/default.jsonl"
SEED = 1234
INSTRUCTION = "Summarise this passage from the Python documentation in one sentence:"


def chatterbot_prompts(n: int, rng: random.Random) -> list[dict]:
    root = resources.files("chatterbot_corpus") / "data" / "english"
    seen, out = set(), []
    for f in sorted(root.iterdir(), key=lambda p: p.name):
        if not f.name.endswith(".yml"):
            continue
        data = yaml.safe_load(f.read_text())
        for conv in data.get("conversations", []):
            first = str(conv[0]).strip()
            if len(first.split()) < 3 or first.lower() in seen:
                continue
            seen.add(first.lower())
            text = first[0].upper() + first[1:]
            if re.match(
                r"(?i)(what|who|how|why|when|where|which|do|does|is|are|can)\b", text
            ) and not text.endswith("?"):
                text += "?"
            out.append(
                {"prompt": text, "source": f"chatterbot-corpus/english/{f.name}", "license": "BSD-3-Clause"}
            )
    rng.shuffle(out)
    return out[:n]


def easy_modules(seed: int, *packages: str) -> dict:
    """mathematics_dataset's generators of ``packages`` (arithmetic, algebra, ...) at the easiest third
    of the training difficulty, with Python's and numpy's generators seeded with ``seed``."""
    import importlib

    # mathematics_dataset imports a sympy name that moved; put it back where it looks.
    import sympy.solvers.diophantine  # noqa: F401

    sys.modules["sympy.solvers.diophantine"].base_solution_linear = sys.modules[
        "sympy.solvers.diophantine.diophantine"
    ].base_solution_linear
    import numpy as np

    mods = {p: importlib.import_module(f"mathematics_dataset.modules.{p}") for p in packages}
    np.random.seed(seed)
    random.seed(seed)
    easy = lambda r: (r[0], r[0] + (r[1] - r[0]) / 3)  # noqa: E731 - difficulty level 0 of 3
    return {p: m.train(easy) for p, m in mods.items()}


def maths_prompts(n: int, rng: random.Random) -> list[dict]:
    mods = easy_modules(SEED, "arithmetic")["arithmetic"]
    names = ["add_or_sub", "mul", "div", "add_sub_multiple", "mixed"]
    out = []
    while len(out) < n:
        name = names[len(out) % len(names)]
        problem = mods[name]()
        q, a = str(problem.question), str(problem.answer)
        if len(q) > 120:
            continue
        out.append(
            {
                "prompt": q,
                "reference": a,
                "source": f"mathematics_dataset/arithmetic/{name}",
                "license": "Apache-2.0",
            }
        )
    return out


def pydoc_prompts(n: int, rng: random.Random) -> list[dict]:
    from pydoc_data.topics import topics

    keys = sorted(k for k, v in topics.items() if len(v) > 300)
    rng.shuffle(keys)
    out = []
    for k in keys[:n]:
        passage = " ".join(topics[k].split())[:500].rsplit(" ", 1)[0]
        out.append(
            {
                "prompt": f"{INSTRUCTION}\n\n{passage}",
                "source": f"cpython/pydoc_data.topics[{k!r}]",
                "license": "PSF-2.0",
            }
        )
    return out


def main() -> None:
    rng = random.Random(SEED)
    rows = chatterbot_prompts(150, rng) + maths_prompts(90, rng) + pydoc_prompts(60, rng)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("w") as f:
        for i, row in enumerate(rows):
            f.write(json.dumps({"id": f"p{i:04d}", **row}, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} prompts to {OUT}")


if __name__ == "__main__":
    main()
