"""The API teacher against a fault-injecting OpenAI-compatible server on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
import yaml
from transformers import AutoTokenizer

from distill import pipeline
from distill.core.answers import read_log
from distill.core.config import ApiConfig, ConfigError, FilterConfig, RunConfig
from distill.core.data import Prompt
from distill.core.recipe import load_config
from distill.evaluate.metrics import last_number_matches
from distill.teacher import api, api_client
from distill.teacher.filters import filter_answers, prompts_to_resample

from conftest import tiny_recipe
from fake_openai import FakeOpenAI

KEY = "sk-test-very-SECRET-0123456789"


def prompts(n: int) -> list[Prompt]:
    return [
        Prompt(f"q{i}", [{"role": "user", "content": f"what is {i} plus {i}?"}], str(2 * i)) for i in range(n)
    ]


def fast_cfg(url: str, **kw) -> ApiConfig:
    base = dict(base_url=url, model="fake", api_key_env="DISTILL_TEST_KEY", concurrency=4, timeout_s=0.5,
                max_retries=3, backoff_s=0.01, max_backoff_s=0.05, max_tokens=16)  # fmt: skip
    return ApiConfig(**{**base, **kw})


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("DISTILL_TEST_KEY", KEY)


# -- rate limit, backoff, Retry-After ---------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, s: float) -> None:
        self.now += s


def test_rate_limiter_holds_requests_per_minute_on_a_fake_clock():
    clock = FakeClock()
    lim = api.RateLimiter(120, None, clock=clock, sleep=clock.sleep)  # 2/s, a burst of 2

    async def go():
        times = []
        for _ in range(6):
            await lim.acquire(0)
            times.append(clock.now)
        return times

    times = asyncio.run(go())
    assert times[:2] == [0.0, 0.0]
    # after the burst, one request every 0.5 s
    assert [round(b - a, 6) for a, b in zip(times[1:], times[2:], strict=False)] == [0.5] * 4


def test_rate_limiter_tokens_per_minute_charges_the_real_usage():
    clock = FakeClock()
    lim = api.RateLimiter(None, 600, clock=clock, sleep=clock.sleep)  # 10 tokens/s, bucket of 10
    assert lim.try_reserve(30) == 0  # bigger than the bucket: goes when it is full, level -20
    assert lim.try_reserve(5) == pytest.approx(2.5)  # (5 + 20) / 10
    lim.settle(30, 10)  # the server says it used 10: refund 20, level back to 0
    assert lim.try_reserve(5) == pytest.approx(0.5)  # 5 tokens at 10/s, not 2.5 s


def test_retry_after_seconds_milliseconds_and_date():
    assert api_client.retry_after_s({"retry-after": "3"}) == 3.0
    assert api_client.retry_after_s({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 < api_client.retry_after_s({"retry-after": when}) <= 30
    assert api_client.retry_after_s({"retry-after": "soon"}) is None
    assert api_client.retry_after_s({}) is None


def test_backoff_doubles_with_jitter_caps_and_honours_retry_after():
    cfg = ApiConfig(backoff_s=1.0, max_backoff_s=10.0)
    rng = random.Random(0)
    for attempt, base in [(0, 1), (1, 2), (2, 4), (3, 8), (4, 10), (9, 10)]:
        d = api.backoff_s(attempt, cfg, None, rng)
        assert base * 0.5 <= d < base
    # Retry-After: never sooner than asked, and spread so workers told the same delay do not all
    # come back at once (defect 12: it used to be exactly 42.0 for every worker)
    waits = [api.backoff_s(0, cfg, 42.0, random.Random(seed)) for seed in range(50)]
    assert all(42.0 <= w <= 42.0 * 1.25 + 1.0 for w in waits)
    assert len({round(w, 6) for w in waits}) == 50 and max(waits) - min(waits) > 5.0


def test_answer_keys_never_collide_for_ids_with_hash_signs():
    pairs = [("a", 1), ("a#1", 0), ("a%231", 0), ("a#1", 1), ("a", 11), ("a#", 11), ("a%", 0), ("a", 0)]
    keys = [api.answer_key(i, j) for i, j in pairs]
    assert len(set(keys)) == len(keys), keys
    assert api.answer_key("plain-id", 0) == "plain-id"  # ids without # or % keep their old keys


def test_api_key_comes_from_the_named_variable_only(monkeypatch):
    monkeypatch.delenv("DISTILL_TEST_KEY")
    with pytest.raises(api.ApiError, match="DISTILL_TEST_KEY"):
        api.api_key(ApiConfig(api_key_env="DISTILL_TEST_KEY"))
    assert api.api_key(ApiConfig(api_key_env=None)) == "none"
    with pytest.raises(ConfigError, match="NAME of an environment variable"):
        load_config(None, [f"teacher.api.api_key_env={KEY}"])


# -- faults -------------------------------------------------------------------------------------------

PLAN = {
    "what is 0 plus 0?": ["429", "ok"],
    "what is 1 plus 1?": ["500", "503"],
    "what is 2 plus 2?": ["timeout"],
    "what is 3 plus 3?": ["reset"],
    "what is 4 plus 4?": ["malformed"],
    "what is 5 plus 5?": ["truncated", "429"],
    "what is 6 plus 6?": ["400"],  # cannot succeed: never retried
    "what is 7 plus 7?": ["500"] * 10,  # fails every attempt: retries are bounded
    "what is 8 plus 8?": ["length"],
}


def test_faults_are_retried_bounded_and_recorded(tmp_path):
    log = tmp_path / "log.jsonl"
    with FakeOpenAI(PLAN, hang_s=1.5) as server:
        stats = api.generate_api_answers(fast_cfg(server.url), prompts(10), log, show_progress=False)
        expected_requests = {0: 2, 1: 3, 2: 2, 3: 2, 4: 2, 5: 3, 6: 1, 7: 4, 8: 1, 9: 1}
        assert {i: server.count(f"what is {i} plus {i}?") for i in range(10)} == expected_requests
        # Retry-After was honoured: the retry of q0 came at least 0.05 s after its 429
        t = [r["t"] for r in server.requests if r["prompt"] == "what is 0 plus 0?"]
        assert t[1] - t[0] >= 0.05
        assert all(r["auth"] == f"Bearer {KEY}" for r in server.requests)
    records = read_log(log)
    ok = api.successes(records)
    assert sorted(ok) == [f"q{i}" for i in (0, 1, 2, 3, 4, 5, 8, 9)]
    assert ok["q1"]["text"] == "the answer is 2" and ok["q1"]["attempts"] == 3
    assert ok["q8"]["finish_reason"] == "length"
    errors = {r["id"]: r["error"]["cause"] for r in records if "error" in r}
    assert errors == {"q6": "http_400", "q7": "http_500"}
    assert stats.as_dict()["failed_by_cause"] == {"http_400": 1, "http_500": 1}
    assert stats.retried == Counter(
        {"http_429": 2, "http_500": 4, "http_503": 1, "timeout": 1, "connection": 2, "malformed": 1}
    )
    assert stats.done == 8 and stats.completion_tokens > 0
    # the 400 echoed the key; what we stored has it scrubbed
    assert KEY not in log.read_text() and "***" in log.read_text()

    # A rerun asks again only for what has no answer, and finishes it once the server recovers.
    with FakeOpenAI({}) as server:
        stats2 = api.generate_api_answers(fast_cfg(server.url), prompts(10), log, show_progress=False)
        assert sorted(r["prompt"] for r in server.requests) == ["what is 6 plus 6?", "what is 7 plus 7?"]
    assert stats2.done == 2 and len(api.successes(read_log(log))) == 10


def test_n_samples_get_their_own_seed_and_are_never_duplicated(tmp_path):
    log = tmp_path / "log.jsonl"
    with FakeOpenAI({"what is 1 plus 1?": ["500", "500", "500", "500"]}) as server:
        api.generate_api_answers(fast_cfg(server.url, n=3, seed=10), prompts(3), log, show_progress=False)
        seeds = {(r["prompt"], r["seed"]) for r in server.requests}
        assert {s for _, s in seeds} == {10, 11, 12}
    with FakeOpenAI({}) as server:
        api.generate_api_answers(fast_cfg(server.url, n=3, seed=10), prompts(3), log, show_progress=False)
        # every sample of q1 failed; only those are asked again
        asked = sorted((r["prompt"], r["seed"]) for r in server.requests)
        assert asked == [("what is 1 plus 1?", 10), ("what is 1 plus 1?", 11), ("what is 1 plus 1?", 12)]
        api.generate_api_answers(fast_cfg(server.url, n=3, seed=10), prompts(3), log, show_progress=False)
        assert len(server.requests) == 3  # nothing left to ask
    keys = [api.answer_key(r["id"], r["sample"]) for r in read_log(log) if "error" not in r]
    assert sorted(keys) == sorted(f"q{i}" + (f"#{j}" if j else "") for i in range(3) for j in range(3))


def test_a_killed_client_loses_nothing_and_duplicates_nothing(tmp_path, tiny_teacher_dir):
    rows = [{"id": f"q{i}", "prompt": f"what is {i} plus {i}?"} for i in range(16)]
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with FakeOpenAI({}, delay_s=0.15) as server:
        recipe = tiny_recipe(tmp_path / "runs", tiny_teacher_dir, data)
        recipe["teacher"].update(kind="openai", api=dict(base_url=server.url, api_key_env="DISTILL_TEST_KEY",
                                                         concurrency=2, max_tokens=8))  # fmt: skip
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        cmd = [sys.executable, "-m", "distill.cli", "generate", "--config", str(path)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        log = tmp_path / "runs" / "tiny" / "api_log.jsonl"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not log.is_file() or len(log.read_text().splitlines()) < 4):
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        n_before = len(read_log(log))
        assert 4 <= n_before < 16
        asked_before = len(server.requests)
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        asked_after = [r["prompt"] for r in server.requests[asked_before:]]
    records = read_log(log)
    assert len(records) == 16 and len({r["id"] for r in records}) == 16  # every prompt once
    done_before = {r["id"] for r in records[:n_before]}
    # the rerun asked only for what was not on disk (in-flight requests at the kill were lost)
    assert not {f"q{i}" for i in range(16) if f"what is {i} plus {i}?" in asked_after} & done_before
    assert len(asked_after) == 16 - n_before
    answers = [json.loads(x) for x in (tmp_path / "runs" / "tiny" / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 16 and all(a["token_ids"][-1] == 2 for a in answers)  # ends with <|im_end|>
    assert KEY not in out.stdout + out.stderr


# -- the whole pipeline from an API teacher -----------------------------------------------------------


def api_recipe(tmp_path, teacher_dir, prompts_file, url: str, **api_kw) -> dict:
    recipe = tiny_recipe(tmp_path / "runs", teacher_dir, prompts_file)
    prices = {"fake": {"prompt": 1000.0, "completion": 2000.0}}
    api_cfg = dict(base_url=url, model="fake", api_key_env="DISTILL_TEST_KEY", prices=prices, **api_kw)
    recipe["teacher"].update(kind="openai", api=api_cfg)
    return recipe


def test_pipeline_from_api_top_logprobs_trains_on_a_sparse_signal(tmp_path, tiny_teacher_dir, prompts_file):
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    with FakeOpenAI({"what is 3 plus 3?": ["wrong"]}, tok=tok) as server:
        recipe = api_recipe(
            tmp_path, tiny_teacher_dir, prompts_file, server.url, top_logprobs=3, endpoint="chat"
        )
        recipe["filter"] = {"verify": "number"}
        cfg = RunConfig.model_validate(recipe)
        results = pipeline.run_all(cfg)
    run = cfg.run_dir
    summary = json.loads((run / "generate_summary.json").read_text())
    assert summary["logprob_mapping"] == {"answers": 13, "logprobs_mapped": 13, "logprobs_unmapped": 0}
    assert summary["teacher_signal"].startswith("sparse top-3")
    usage = summary["total"]
    assert usage["cost_usd"] == pytest.approx(
        (usage["prompt_tokens"] * 1000 + usage["completion_tokens"] * 2000) / 1e6
    )
    answers = [json.loads(x) for x in (run / "answers.jsonl").read_text().splitlines()]
    for a in answers:  # the server's tokens became our ids, and they decode back to the text
        assert tok.decode(a["token_ids"][:-1]) == a["text"] and a["token_ids"][-1] == tok.eos_token_id
        assert len(a["top_ids"]) == len(a["token_ids"]) and a["top_ids"][0][0] == a["token_ids"][0]
    meta = json.loads((run / "teacher_cache" / "meta.json").read_text())
    assert meta["k"] == 3 and meta["teacher"] == f"openai:fake@{server.url}"
    train_summary = json.loads((run / "train_summary.json").read_text())
    assert train_summary["teacher_signal"] == "cached top-3 teacher log-probs from the API, tail: bucket"
    report = json.loads((run / "filter_report.json").read_text())
    q3_trains = "q3" in json.loads((run / "split.json").read_text())["train"]
    assert report["dropped_by_reason"] == ({"wrong_answer": 1} if q3_trains else {})  # q3's answer is wrong
    assert results["summary"]["teacher_cost_usd"] == usage["cost_usd"] > 0
    for f in run.rglob("*"):
        if f.is_file():
            assert KEY.encode() not in f.read_bytes(), f


def test_pipeline_from_api_text_only_is_sequence_level_kd(tmp_path, tiny_teacher_dir, prompts_file):
    with FakeOpenAI({}) as server:
        recipe = api_recipe(tmp_path, tiny_teacher_dir, prompts_file, server.url, endpoint="completions")
        cfg = RunConfig.model_validate(recipe)
        pipeline.generate(cfg)
        pipeline.shrink(cfg)
        pipeline.train_student(cfg)
        # the completions endpoint got our chat template's rendering of the prompt
        assert server.requests[0]["prompt"].startswith("<|im_start|>user\n")
    run = cfg.run_dir
    assert not (run / "teacher_cache").exists()
    assert "sequence-level KD" in json.loads((run / "train_summary.json").read_text())["teacher_signal"]
    assert "sequence-level KD" in json.loads((run / "generate_summary.json").read_text())["teacher_signal"]


def test_api_teacher_without_a_local_model_trains_and_evaluates_a_given_student(
    tmp_path, tiny_teacher_dir, prompts_file
):
    with FakeOpenAI({}) as server:
        recipe = api_recipe(tmp_path, tiny_teacher_dir, prompts_file, server.url)
        recipe["teacher"]["model"] = None
        with pytest.raises(ValueError, match="student.init=model"):
            RunConfig.model_validate(recipe)
        recipe["student"] = {"init": "model", "model": str(tiny_teacher_dir)}
        results = pipeline.run_all(RunConfig.model_validate(recipe))
    # no local teacher: its row is its stored answers; fidelity to it and speed-ups are not measured
    assert results["teacher"]["kl"] is None and results["teacher"]["rouge_l"] == 1.0
    assert results["summary"]["speedup_batch1"] is None and results["summary"]["teacher_cost_usd"] > 0
    assert results["student"]["perplexity"] > 0 and results["student"]["tokens_per_s_batch1"] > 0
    card = (tmp_path / "runs" / "tiny" / "export" / "README.md").read_text()
    assert "fake (through an OpenAI-compatible API)" in card


# -- token mapping and filters ------------------------------------------------------------------------


def test_token_map_maps_pieces_and_refuses_what_does_not_round_trip(tiny_teacher_dir):
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    tmap = api.TokenMap(tok)
    ids = tok("the cat sat on the mat", add_special_tokens=False)["input_ids"]
    pieces = [tok.decode([i]) for i in ids]
    rows = [{"token": p, "bytes": None, "logprob": -0.5, "top": [[p, None, -0.5]]} for p in pieces]
    rec = {"text": "the cat sat on the mat", "logprobs": rows}
    got = api.map_logprobs(rec, tmap, 5)
    assert got is not None and got[0] == ids and got[1] == [[i] for i in ids]
    # bytes win over the string when a server sends them
    rec["logprobs"][0]["bytes"] = list(pieces[0].encode())
    rec["logprobs"][0]["token"] = "garbage"
    assert api.map_logprobs(rec, tmap, 5)[0] == ids
    rec["logprobs"][1]["token"] = "\u2603 snowman not in vocab"
    assert api.map_logprobs(rec, tmap, 5) is None
    rec2 = {
        "text": "something else",
        "logprobs": [{"token": p, "bytes": None, "logprob": 0.0, "top": []} for p in pieces],
    }
    assert api.map_logprobs(rec2, tmap, 5) is None  # ids do not decode back to the text


def test_filters_dedupe_length_finish_reason_and_verification():
    ps = [
        Prompt("a", [{"role": "user", "content": "x"}], "1/2"),
        Prompt("b", [{"role": "user", "content": "y"}]),
    ]
    answers = {
        "a": {"id": "a", "sample": 0, "text": "it is 0.5", "finish_reason": "stop"},
        "a#1": {"id": "a", "sample": 1, "text": "it  is 0.5", "finish_reason": "stop"},  # same up to spaces
        "a#2": {"id": "a", "sample": 2, "text": "it is 0.25", "finish_reason": "stop"},
        "a#3": {"id": "a", "sample": 3, "text": "it is", "finish_reason": "length"},
        "b": {"id": "b", "sample": 0, "text": "ok", "finish_reason": "stop"},
        "b#1": {"id": "b", "sample": 1, "text": "far too long an answer", "finish_reason": "stop"},
    }
    cfg = FilterConfig(finish_reasons=["stop"], max_chars=12, verify="number")
    kept, report = filter_answers(ps, answers, cfg)
    assert [(p.id, r["sample"]) for p, r in kept] == [("a", 0), ("b", 0)]
    assert report["dropped_by_reason"] == {"duplicate": 1, "wrong_answer": 1, "finish_reason_length": 1,
                                           "too_long": 1}  # fmt: skip
    assert report["kept_without_reference"] == 1
    c = [Prompt("c", [{"role": "user", "content": "z"}], r"\b0\.5\b")]
    c_answers = {k.replace("a", "c"): {**v, "id": "c"} for k, v in answers.items() if k.startswith("a")}
    kept, report = filter_answers(c, c_answers, FilterConfig(dedupe=False, verify="regex"))
    assert [r["sample"] for _, r in kept] == [0, 1] and report["dropped_by_reason"] == {"wrong_answer": 2}
    assert last_number_matches("so x = 1,000", "1000") and not last_number_matches("x = 3", "4")


def test_labelling_answers_are_verified_and_resampled_ones_count_until_one_passes():
    """verify_choices keeps an answer that names exactly one of the prompt's labels (its reference,
    when it has one). Answers from ``resample_from`` on count only for a prompt with no answer kept
    before them, and only the first of them that passes."""
    user = [{"role": "user", "content": "Positive or negative? Lovely."}]
    ps = [Prompt("a", user, None, {"choices": ["positive", "negative"]}),
          Prompt("r", user, "positive", {"choices": ["positive", "negative"]}),
          Prompt("n", user)]  # fmt: skip
    texts = {
        "a": ["Both positive and negative.", "It is Positive!", "negative", "positive"],
        "r": ["Negative.", "the sentiment is neutral", "POSITIVE", "positive."],
        "n": ["anything", "more", "again", "and again"],
    }
    answers = {f"{i}#{j}": {"id": i, "sample": j, "text": t, "finish_reason": "stop"}
               for i, ts in texts.items() for j, t in enumerate(ts)}  # fmt: skip
    kept, report = filter_answers(ps, answers, FilterConfig(verify_choices=True), resample_from=1)
    assert [(p.id, r["sample"]) for p, r in kept] == [("a", 1), ("r", 2), ("n", 0)]
    assert report["dropped_by_reason"] == {"no_single_choice": 2, "wrong_choice": 1}
    assert report["kept_by_resampling"] == 2
    # without resampling every answer is weighed on its own; unverified, every one is kept
    kept, _ = filter_answers(ps, answers, FilterConfig(verify_choices=True))
    assert [(p.id, r["sample"]) for p, r in kept if p.id != "n"] == [("a", 1), ("a", 2), ("a", 3),
                                                                    ("r", 2), ("r", 3)]  # fmt: skip
    assert len(filter_answers(ps, answers, FilterConfig())[0]) == 12
    # a labelling row with a reference is verified by its labels, not by ``verify: number``, so the
    # mathematics rows of the same set can be verified beside it
    both = FilterConfig(verify_choices=True, verify="number")
    assert [(p.id, r["sample"]) for p, r in filter_answers(ps[1:2], answers, both)[0]] == [("r", 2), ("r", 3)]
    # with extra samples (resampling from 2), a passing extra sample is kept beside the greedy answer
    kept, report = filter_answers(ps[:1], answers, FilterConfig(verify_choices=True), resample_from=2)
    assert [r["sample"] for _, r in kept] == [1] and report["kept_by_resampling"] == 0
    greedy = {k: v for k, v in answers.items() if k.endswith("#0")}
    assert [p.id for p in prompts_to_resample(ps, greedy, FilterConfig(verify_choices=True), 1)] == ["a", "r"]
