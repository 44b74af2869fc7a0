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
import random
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
    # mathematics_dataset imports a sympy name that moved; put it back where it looks.
    import sympy.solvers.diophantine  # noqa: F401

    sys.modules["sympy.solvers.diophantine"].base_solution_linear = sys.modules[
        "sympy.solvers.diophantine.diophantine"
    ].base_solution_linear
    import numpy as np
    from mathematics_dataset.modules import algebra, arithmetic

    np.random.seed(SEED)
    random.seed(SEED)
    easy = lambda r: (r[0], r[0] + (r[1] - r[0]) / 3)  # noqa: E731 - difficulty level 0 of 3
    modules = {"arithmetic": arithmetic.train(easy), "algebra": algebra.train(easy)}
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
            rows.append({"id": f"{task}-{n:03d}", "task": task, "prompt": q, "reference": a,
                         "source": f"mathematics_dataset/{task}/{name}", "license": "Apache-2.0"})  # fmt: skip
            n += 1
    out = ROOT / "prompts" / "maths_tasks.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} problems -> {out}")


if __name__ == "__main__":
    main()
