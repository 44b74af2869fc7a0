"""The HumanEval runner against hostile programs: a wrong answer with its own `unittest.main()`, an
early exit, processes that outlive the timeout, a fork loop, writes outside its folder, a raw
`_socket` and a Unix socket of the host, a print loop, bytes that are not UTF-8; and the refusal
where no sandbox can be made, with the reason.

Each runs in the bubblewrap sandbox (skipped where bubblewrap cannot make one) and, where the case
does not need the sandbox, also unconfined (``evaluate.unsafe_code``)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
import tracemalloc
from pathlib import Path

import pytest

from distill.core.config import ConfigError, EvaluateConfig
from distill.evaluate import tasks

SANDBOX = tasks.sandbox_available()
NO_SANDBOX = "bubblewrap cannot make a sandbox here (make install-bubblewrap)"
needs_sandbox = pytest.mark.skipif(not SANDBOX, reason=NO_SANDBOX)


@pytest.fixture(params=["sandbox", "unsafe"])
def unsafe(request, monkeypatch) -> bool:
    """Run the test in the sandbox, then unconfined (``run_program(..., unsafe_code=True)``)."""
    if request.param == "sandbox":
        if not SANDBOX:
            pytest.skip(NO_SANDBOX)
        return False
    monkeypatch.setattr(tasks, "sandbox_available", lambda: False)
    return True


def _alive(marker: str) -> list[int]:
    """Processes whose command line holds ``marker``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found


def test_a_wrong_answer_with_its_own_unittest_main_or_an_early_exit_fails(unsafe):
    add = next(it for it in tasks.load_task("humaneval") if it.prompt.id == "HumanEval-53")
    assert add.test["entry_point"] == "add"
    own_test = ("import unittest\n\nclass T(unittest.TestCase):\n    def test_add(self):\n"
                "        self.assertEqual(add(2, 2), 0)\n\n"
                "if __name__ == '__main__':\n    unittest.main()\n")  # fmt: skip
    wrong = f"```python\ndef add(x: int, y: int):\n    return x - y\n\n{own_test}```"
    assert tasks.score(add, wrong, unsafe_code=unsafe)[0] == 0.0
    right = f"```python\ndef add(x: int, y: int):\n    return x + y\n\n{own_test}```"
    assert tasks.score(add, right, unsafe_code=unsafe) == (1.0, "")  # its own test is not run
    exited = "RuntimeError: the program exited"
    for leave, said in (("import sys\nsys.exit(0)", exited), ("raise SystemExit", exited),
                        ("import os\nos._exit(0)", tasks._ENDED_EARLY)):  # fmt: skip
        score, why = tasks.score(add, f"```python\ndef add(x: int, y: int):\n    return x - y\n{leave}\n```",
                                 unsafe_code=unsafe)  # fmt: skip
        assert score == 0.0 and why.startswith(said), why
    # the nonce that tells a finished program was read from stdin before the program ran
    stdin_empty = "import sys\nassert sys.stdin.buffer.read() == b''\n"
    assert tasks.run_program(stdin_empty, unsafe_code=unsafe) == (True, "")


def test_no_process_of_a_program_is_left_after_its_timeout(unsafe):
    marker = f"{time.time_ns() % 10**9}.5"  # a sleep of its own, found by its command line
    detach = "os.setsid()\n    " if not unsafe else ""  # leaves the process group; the sandbox holds it
    program = (f"import os\nif os.fork() == 0:\n    {detach}os.execv('/bin/sleep', ['sleep', '{marker}'])\n"
               "while True:\n    pass\n")  # fmt: skip
    assert tasks.run_program(program, timeout=1.5, unsafe_code=unsafe) == (False, "timed out after 1.5 s")
    for _ in range(20):  # SIGKILL is delivered at once; its reaping may lag a little
        if not _alive(marker):
            break
        time.sleep(0.1)
    assert not _alive(marker)
    # and none is left by a program that ends before its timeout
    program = f"import os\nif os.fork() == 0:\n    {detach}os.execv('/bin/sleep', ['sleep', '{marker}'])\n"
    assert tasks.run_program(program, unsafe_code=unsafe) == (True, "")
    time.sleep(0.2)
    assert not _alive(marker)


@needs_sandbox
def test_a_program_may_have_only_a_few_processes():
    program = ("import os, time\nn = 0\nfor _ in range(150):\n    try:\n        pid = os.fork()\n"
               "    except OSError:\n        break\n"
               "    if pid == 0:\n        time.sleep(1)\n        os._exit(0)\n"
               "    n += 1\nraise RuntimeError(f'forked {n}')\n")  # fmt: skip
    ok, why = tasks.run_program(program, timeout=20)
    assert not ok and why.startswith("RuntimeError: forked "), why
    assert int(why.split()[-1]) < tasks.MAX_PROCESSES


@needs_sandbox
def test_a_program_writes_only_in_its_own_folder(tmp_path):
    beside = Path(tempfile.mkdtemp(dir="/var/tmp" if os.path.isdir("/var/tmp") else Path.cwd()))
    beside.chmod(0o777)  # open to anyone, the sandbox's user included: only the sandbox keeps it out
    tmp_path.chmod(0o777)
    try:
        for target in (tmp_path / "out.txt", beside / "out.txt"):  # /tmp is the sandbox's own
            ok, why = tasks.run_program(f"open('mine.txt', 'w').write('x')\nopen({str(target)!r}, 'w')")
            assert not ok and not target.exists(), why
        assert "No such file or directory" in why  # the host's /var is not in the sandbox
        ok, why = tasks.run_program("import os\nos.listdir('/root') if os.path.isdir('/root') else None\n"
                                    "import site\nopen(site.__file__, 'a')\n")  # fmt: skip
        assert not ok and ("Read-only file system" in why or "Permission denied" in why), why
    finally:
        shutil.rmtree(beside)


# the socket type of _socket, past the program's Python-level block (_NO_NETWORK) as any program can go
RAW_SOCKET = "import socket\nraw = socket.socket.__bases__[0].__bases__[0]\n"


def test_a_raw_socket_reaches_nothing(unsafe):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        port = server.getsockname()[1]
        program = f"{RAW_SOCKET}raw(socket.AF_INET, socket.SOCK_STREAM).connect(('127.0.0.1', {port}))"
        ok, why = tasks.run_program(program, unsafe_code=unsafe)
        if unsafe:  # unconfined, the raw socket gets through: the sandbox's network namespace stops it
            assert (ok, why) == (True, "")
            server.accept()[0].close()
            return
        assert not ok and ("ConnectionRefusedError" in why or "Network is unreachable" in why), why
        with pytest.raises(BlockingIOError):  # nothing knocked
            server.accept()


def test_a_unix_socket_of_the_host_is_out_of_reach(unsafe):
    # where a host keeps its sockets (D-Bus, docker), else a folder the old whole-root sandbox showed
    base = next(p for p in ("/run", "/var/tmp", str(Path.home())) if os.access(p, os.W_OK | os.X_OK))
    folder = Path(tempfile.mkdtemp(dir=base))
    try:
        folder.chmod(0o755)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            server.bind(str(folder / "bus"))
            (folder / "bus").chmod(0o777)  # open to anyone, the sandbox's user included
            server.listen()
            server.setblocking(False)
            program = f"{RAW_SOCKET}raw(socket.AF_UNIX, socket.SOCK_STREAM).connect({str(folder / 'bus')!r})"
            ok, why = tasks.run_program(program, unsafe_code=unsafe)
            if unsafe:
                assert (ok, why) == (True, "")
                server.accept()[0].close()
                return
            assert not ok and "FileNotFoundError" in why, why
            with pytest.raises(BlockingIOError):
                server.accept()
    finally:
        shutil.rmtree(folder)


@needs_sandbox
def test_the_sandbox_shows_only_the_system_and_python():
    shown = {Path(p).parts[1] for p in (*tasks._SYSTEM, *tasks._ETC, *map(str, tasks._python_places()))}
    etc = {Path(p).name for p in tasks._ETC}
    shown |= {"proc", "dev", "tmp"}
    program = (f"import os\nassert set(os.listdir('/')) <= {shown!r}, os.listdir('/')\n"
               f"assert set(os.listdir('/etc')) <= {etc!r}, os.listdir('/etc')\n"
               "assert set(os.listdir('/tmp')) == {'work', 'program.py'}\n")  # fmt: skip
    assert tasks.run_program(program) == (True, "")


def test_output_is_capped_and_bytes_that_are_not_utf8_are_replaced(unsafe):
    loop = "import sys\nwhile True:\n    print('x' * 4096)\n    sys.stderr.write('y' * 4096)\n"
    tracemalloc.start()
    try:
        assert tasks.run_program(loop, timeout=1.5, unsafe_code=unsafe) == (False, "timed out after 1.5 s")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * tasks.OUTPUT_KEPT + (1 << 20)  # a kept tail, not the gigabyte printed
    ok, why = tasks.run_program(
        "import os\nos.write(2, b'bad \\xff\\xfe end\\n')\nos._exit(1)", unsafe_code=unsafe
    )
    assert (ok, why) == (False, "bad \ufffd\ufffd end")
    ok, why = tasks.run_program("import os\nos.write(2, b'\\xff' * 300000)\nos._exit(1)", unsafe_code=unsafe)
    assert not ok and why == "\ufffd" * 200  # the end of a long last line


def test_code_is_refused_without_a_sandbox_unless_unsafe_code(monkeypatch):
    monkeypatch.setattr(tasks, "sandbox_available", lambda: False)
    with pytest.raises(ConfigError, match=r"evaluate.unsafe_code=true"):
        tasks.check_code_sandbox(EvaluateConfig(tasks=["arithmetic", "humaneval"]))
    with pytest.raises(ConfigError, match=r"bubblewrap"):
        tasks.run_program("pass")
    tasks.check_code_sandbox(EvaluateConfig(tasks=["arithmetic"]))  # no code to run
    tasks.check_code_sandbox(EvaluateConfig(tasks=["humaneval"], unsafe_code=True))
    assert tasks.run_program("pass", unsafe_code=True) == (True, "")


def test_the_refusal_says_why_the_sandbox_probe_failed(monkeypatch):
    failing = ["sh", "-c", "echo 'bwrap: setting up uid map: Permission denied' >&2; exit 1", "--"]
    monkeypatch.setattr(tasks, "_sandbox", lambda folder, program: failing)
    problem = tasks._sandbox_problem.__wrapped__()  # the probe, not its cached answer
    assert problem == "bwrap: setting up uid map: Permission denied"
    monkeypatch.setattr(tasks, "_sandbox_problem", lambda: problem)
    assert not tasks.sandbox_available()
    with pytest.raises(ConfigError, match=r"unconfined \(the probe said: bwrap: setting up uid map"):
        tasks.check_code_sandbox(EvaluateConfig(tasks=["humaneval"]))


def test_evaluate_refuses_code_before_any_answer_without_a_sandbox(monkeypatch):
    monkeypatch.setattr(tasks, "sandbox_available", lambda: False)
    calls = []
    monkeypatch.setattr("distill.core.generation.generate_batch", lambda *a, **k: calls.append(a) or [])

    class Cfg:
        evaluate = EvaluateConfig(tasks=["humaneval"], task_size=2)

    with pytest.raises(ConfigError, match="evaluate.unsafe_code"):
        tasks.evaluate_tasks({"teacher": object()}, object(), Cfg())
    assert calls == []
