"""Rebuild src/distill/prompts/maths_tasks.jsonl, the built-in arithmetic and algebra task sets.

DeepMind mathematics_dataset 1.0.1 (Apache-2.0), easiest third of the training difficulty, seed 4321:
100 `arithmetic` questions (add_or_sub, mul, div, add_sub_multiple, mixed) and 100 `algebra`
questions (linear_1d, linear_2d), each with the generator's exact answer as `reference`. Questions
that are prompts of the embedded prompt set (default.jsonl) are left out, so a task never scores a
prompt the default run trained on; answers that are not a plain number are left out too, so the
score is an exact comparison of numbers.

    pip install --no-deps mathematics_dataset==1.0.1 absl-py six
    python tools/build_tasks.py
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "distill"
SEED = 4321
SETS = {
    "arithmetic": ["add_or_sub", "mul", "div", "add_sub_multiple", "mixed"],
    "algebra": ["linear_1d", "linear_2d"],
}
PER_SET = 100
PLAIN_NUMBER = re.compile(r"-?\d+(\.\d+)?")


def main() -> None:
    if os.environ.get("PYTHONHASHSEED") != "0":  # sympy's set order, and so the algebra questions,
        env = {**os.environ, "PYTHONHASHSEED": "0"}  # follow the string hash: fix it
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    from build_default_prompts import easy_modules  # tools/ is on the path when run as a script

    modules = easy_modules(SEED, "arithmetic", "algebra")
    taken = {json.loads(x)["prompt"] for x in (ROOT / "prompts" / "default.jsonl").open()}
    rows = []
    for task, names in SETS.items():
        n = 0
        while n < PER_SET:
            name = names[n % len(names)]
            problem = modules[task][name]()
            q, a = str(problem.question), str(problem.answer)
            if len(q) > 120 or q in taken or not PLAIN_NUMBER.fullmatch(a):
                continue
            taken.add(q)
            source = f"mathematics_dataset/{task}/{name}"
            rows.append({"id": f"{task}-{n:03d}", "task": task, "prompt": q, "reference": a, "source": source,
                         "license": "Apache-2.0"})  # fmt: skip
            n += 1
    out = ROOT / "prompts" / "maths_tasks.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} problems -> {out}")


if __name__ == "__main__":
    main()
