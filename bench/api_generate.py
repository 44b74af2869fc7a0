"""API teacher generation speed against llama.cpp's OpenAI-compatible server, and the client's overhead.

    python bench/api_generate.py [--prompts 48] [--max-tokens 32]

Starts ``python -m llama_cpp.server`` with the SmolLM2-135M-Instruct GGUF on loopback
(2 threads) and asks it for answers to the first ``--prompts`` embedded prompts with
distill's API client at concurrency 1, 4 and 16 (greedy, a fresh log each time). It records
answers/s and completion tokens/s, and the client's own overhead two ways:

* ``client_overhead_share``: CPU time of the client process / wall time of the run;
* ``vs_bare_client_wall_ratio``: wall time of distill's client / wall time of a bare client
  (the same openai calls under a semaphore: no rate limiter, retries, fsynced log, progress).

Figures go to bench/results/api_generate.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "api_generate.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(gguf: Path, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", "2048", "--n_threads", str(threads)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(240):
        try:
            urllib.request.urlopen(url + "/models", timeout=2).read()
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("llama.cpp server did not start")


def run_distill(cfg, prompts, workdir: Path) -> dict:
    from distill.teacher.api import generate_api_answers

    log = workdir / f"log-{time.monotonic_ns()}.jsonl"
    cpu0, t0 = time.process_time(), time.perf_counter()
    stats = generate_api_answers(cfg, prompts, log, show_progress=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    d = stats.as_dict()
    assert d["done"] == len(prompts), d
    return {"wall_s": wall, "client_cpu_s": cpu, "answers_per_s": d["done"] / wall,
            "completion_tokens_per_s": d["completion_tokens"] / wall,
            "completion_tokens": d["completion_tokens"], "retries": d["retries"]}  # fmt: skip


def run_bare(cfg, prompts) -> dict:
    """The least a client can do: the same requests, a semaphore, nothing kept but the text."""
    import openai

    async def main() -> int:
        client = openai.AsyncOpenAI(
            base_url=cfg.base_url, api_key="none", max_retries=0, timeout=cfg.timeout_s
        )
        sem = asyncio.Semaphore(cfg.concurrency)

        async def one(p) -> int:
            async with sem:
                r = await client.chat.completions.create(
                    model=cfg.model, messages=p.messages, temperature=0, max_tokens=cfg.max_tokens, seed=0
                )
                return r.usage.completion_tokens

        try:
            return sum(await asyncio.gather(*(one(p) for p in prompts)))
        finally:
            await client.close()

    cpu0, t0 = time.process_time(), time.perf_counter()
    tokens = asyncio.run(main())
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"wall_s": wall, "client_cpu_s": cpu, "answers_per_s": len(prompts) / wall,
            "completion_tokens_per_s": tokens / wall, "completion_tokens": tokens}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from distill.core.config import ApiConfig
    from distill.core.data import read_prompts
    from distill.core.models import resolve_gguf

    prompts = read_prompts(None)[: args.prompts]
    proc, url = start_server(resolve_gguf("smollm2-135m-instruct"), args.threads)
    rows: dict[str, dict] = {}
    try:
        base = dict(
            base_url=url, model="smollm2", api_key_env=None, max_tokens=args.max_tokens, temperature=0.0
        )
        with tempfile.TemporaryDirectory() as tmp:
            run_bare(ApiConfig(**base, concurrency=4), prompts[:4])  # warm-up: server caches, imports
            for c in (1, 4, 16):
                rows[f"distill_c{c}"] = run_distill(ApiConfig(**base, concurrency=c), prompts, Path(tmp))
                print(c, rows[f"distill_c{c}"], flush=True)
            # the overhead pair, interleaved twice so a slow moment hits both
            for rep in (1, 2):
                rows[f"bare_c16_{rep}"] = run_bare(ApiConfig(**base, concurrency=16), prompts)
                if rep == 2:
                    rows["distill_c16_2"] = run_distill(ApiConfig(**base, concurrency=16), prompts, Path(tmp))
                print(rep, rows[f"bare_c16_{rep}"], flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    ours = [rows["distill_c16"], rows["distill_c16_2"]]
    bare = [rows["bare_c16_1"], rows["bare_c16_2"]]
    share = min(r["client_cpu_s"] / r["wall_s"] for r in ours)
    ratio = min(r["wall_s"] for r in ours) / min(r["wall_s"] for r in bare)
    result = {
        "client_overhead_share": share,
        "vs_bare_client_wall_ratio": ratio,
        "answers_per_s": {c: rows[f"distill_c{c}"]["answers_per_s"] for c in (1, 4, 16)},
        "completion_tokens_per_s": {c: rows[f"distill_c{c}"]["completion_tokens_per_s"] for c in (1, 4, 16)},
        "raw": rows,
        "setup": {
            "server": "llama-cpp-python 0.3.36 server, SmolLM2-135M-Instruct Q4_1 GGUF",
            "server_threads": args.threads,
            "prompts": len(prompts),
            "max_tokens": args.max_tokens,
            "endpoint": "chat",
            "temperature": 0,
        },  # fmt: skip
        "command": " ".join(["python", *sys.argv]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    keys = ("client_overhead_share", "vs_bare_client_wall_ratio", "answers_per_s", "completion_tokens_per_s")
    print(json.dumps({k: result[k] for k in keys}, indent=1))


if __name__ == "__main__":
    main()
