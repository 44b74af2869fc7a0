"""On-policy distillation: the student samples, the teacher grades its tokens; lambda mixes."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

import distill.train.loop as tr
from distill.core.config import TrainConfig
from distill.core.generation import eos_ids
from distill.student.prune import shrink_layers
from distill.teacher.signal import LiveTeacher
from distill.train import onpolicy


@pytest.fixture()
def setup(tiny_training):
    return tiny_training


def _cfg(**kw):
    base = dict(max_steps=4, batch_size=3, grad_accum=2, warmup_steps=1, lr=5e-3, checkpoint_every=2,
                keep_checkpoints=4, dtype="float32", onpolicy_max_new_tokens=6)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _train(teacher, examples, cfg, folder):
    student = shrink_layers(teacher, [0, 3])
    tr.train(student, LiveTeacher(teacher), examples, cfg, folder, pad_id=0)
    return student


def test_lambda_zero_is_exactly_the_offpolicy_path(setup, tmp_path):
    teacher, _, examples = setup
    plain = _train(teacher, examples, _cfg(), tmp_path / "plain")
    other = dict(onpolicy_fraction=0.0, onpolicy_schedule="linear", onpolicy_temperature=0.5,
                 onpolicy_loss="reverse_kl")  # every on-policy setting but lambda changed  # fmt: skip
    zero = _train(teacher, examples, _cfg(**other), tmp_path / "zero")
    for (k, a), b in zip(plain.state_dict().items(), zero.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    full = _train(teacher, examples, _cfg(onpolicy_fraction=1.0), tmp_path / "full")  # negative control
    pairs = zip(plain.state_dict().values(), full.state_dict().values(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["onpolicy_rows"] for r in rows] == [6] * 4  # every sequence of every step was the student's


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(setup):
    teacher, _, examples = setup
    student = shrink_layers(teacher, [0, 3])
    prompts = [ids[: m.index(True)] for ids, m in examples[:4]]
    cfg = _cfg()
    state = torch.random.get_rng_state()
    a = onpolicy.sample_answers(student, prompts, cfg, 0, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert onpolicy.sample_answers(student, prompts, cfg, 0, seed=5) == a
    assert onpolicy.sample_answers(student, prompts, cfg, 0, seed=6) != a
    assert all(1 <= len(x) <= 6 for x in a)


def test_the_time_plans_probe_samples_answers_of_full_length(setup):
    """Half the vocabulary ends an answer: sampled answers stop within a few tokens, except with
    ``full_length`` (the time plan's probe), where every one runs to onpolicy_max_new_tokens."""
    teacher, _, examples = setup
    student = shrink_layers(teacher, [0, 3])
    vocab = student.config.vocab_size
    student.generation_config.eos_token_id = list(range(0, vocab, 2))
    prompts = [ids[: m.index(True)] for ids, m in examples[:6]]
    cfg = _cfg(onpolicy_max_new_tokens=8)
    short = onpolicy.sample_answers(student, prompts, cfg, 0, seed=1)
    assert sum(len(a) for a in short) < 6 * 8 / 2
    full = onpolicy.sample_answers(student, prompts, cfg, 0, seed=1, full_length=True)
    assert [len(a) for a in full] == [8] * 6
    assert all(t % 2 == 1 for a in full for t in a)  # no answer ended early


def test_samples_come_from_the_students_distribution_whatever_its_generation_config(setup, monkeypatch):
    """A student whose generation config asks for a repetition penalty, min-p, top-k, top-p and an
    n-gram ban still samples from its whole distribution at the on-policy temperature: no logits
    processor but the temperature, the very tokens a plain seeded sampler draws, and its own
    generation config left as it was."""
    teacher, _, examples = setup
    student = shrink_layers(teacher, [0, 3])
    own = copy.deepcopy(student.generation_config)
    own.update(do_sample=True, repetition_penalty=1.5, min_p=0.3, top_k=5, top_p=0.5, no_repeat_ngram_size=2)
    student.generation_config = own
    seen = []
    processors = student._get_logits_processor

    def spy(*args, **kwargs):
        made = processors(*args, **kwargs)
        seen.append([type(p).__name__ for p in made])
        return made

    monkeypatch.setattr(student, "_get_logits_processor", spy)
    prompt = examples[0][0][: examples[0][1].index(True)]
    cfg = _cfg(onpolicy_temperature=0.7, onpolicy_max_new_tokens=12)
    (got,) = onpolicy.sample_answers(student, [prompt], cfg, 0, seed=3)
    assert seen == [["TemperatureLogitsWarper"]]
    assert student.generation_config is own and own.repetition_penalty == 1.5

    torch.manual_seed(3)  # the reference: softmax(logits / 0.7), one multinomial draw a token
    ids, want, stop = list(prompt), [], eos_ids(own, None)
    with torch.no_grad():
        while len(want) < 12 and (not want or want[-1] not in stop):
            logits = student(input_ids=torch.tensor([ids])).logits[:, -1].float()  # (1, V)
            token = int(torch.multinomial(torch.softmax(logits / 0.7, -1), 1))
            ids.append(token)
            want.append(token)
    assert got == want


def test_onpolicy_loss_matches_a_hand_computed_jsd(setup):
    """The teacher grades the student's own tokens; the loss is JSD(beta) on those positions alone."""
    teacher, _, examples = setup
    student = shrink_layers(teacher, [0, 3])
    cfg = _cfg(onpolicy_fraction=1.0, jsd_beta=0.3)
    batch = tr.collate(examples[:3], 0)
    ((on_batch, on),) = onpolicy.mix(batch, student, cfg, 0, step=0, micro=0, rank=0)
    assert on and on_batch.input_ids.shape[0] == 3
    for (ids, m), (new_ids, new_m) in zip(examples[:3], onpolicy._rows(on_batch), strict=True):
        p = m.index(True)
        assert new_ids[:p] == ids[:p] and not any(new_m[:p]) and all(new_m[p:])  # same prompt, new answer
    n = on_batch.num_target_tokens
    on_cfg = cfg.model_copy(update={"alpha": 1.0, "loss": "jsd", "chunked_loss": False})
    got = tr.distill_loss(student, LiveTeacher(teacher), on_batch, on_cfg, n).loss
    with torch.no_grad():
        s = torch.log_softmax(student(input_ids=on_batch.input_ids, attention_mask=on_batch.attention_mask)
                              .logits[:, :-1].double(), -1)  # fmt: skip
        t = torch.log_softmax(teacher(input_ids=on_batch.input_ids, attention_mask=on_batch.attention_mask)
                              .logits[:, :-1].double(), -1)  # fmt: skip
    total = 0.0
    for b, pos in on_batch.answer_mask[:, 1:].nonzero().tolist():
        p, q = t[b, pos].exp(), s[b, pos].exp()
        mix = 0.3 * p + 0.7 * q
        total += float(0.3 * (p * (p / mix).log()).sum() + 0.7 * (q * (q / mix).log()).sum())
    assert float(got) == pytest.approx(total / n, rel=1e-5)


def test_a_resumed_onpolicy_run_samples_what_an_uninterrupted_one_did(setup, tmp_path):
    teacher, _, examples = setup
    cfg = _cfg(onpolicy_fraction=0.5)
    whole = _train(teacher, examples, cfg, tmp_path / "a")
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        tmp_path / "a" / "checkpoints" / "step-000002", tmp_path / "b" / "checkpoints" / "step-000002"
    )
    resumed = _train(teacher, examples, cfg, tmp_path / "b")
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_linear_schedule_rises_to_lambda():
    cfg = _cfg(onpolicy_fraction=0.8, onpolicy_schedule="linear", max_steps=5)
    assert [onpolicy.fraction_at(s, cfg) for s in range(5)] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8])
    assert onpolicy.fraction_at(3, _cfg(onpolicy_fraction=0.8)) == 0.8


def test_cached_off_policy_rows_and_live_graded_samples(
    tmp_path, tiny_teacher_dir, prompts_file, monkeypatch
):
    """With a cache, the off-policy rows take its top-k signal and the student's own samples are
    graded by the live teacher, which alone knows them."""
    import yaml

    from distill import pipeline
    from distill.core.recipe import load_config
    from distill.teacher.cache import CachedTeacher

    from conftest import tiny_recipe

    train = {"onpolicy_fraction": 0.5, "onpolicy_max_new_tokens": 5, "max_steps": 3}
    recipe = tiny_recipe(
        tmp_path / "runs", tiny_teacher_dir, prompts_file, cache={"use": True, "k": 8}, train=train
    )
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    cfg = load_config(tmp_path / "r.yaml")
    pipeline.generate(cfg)
    pipeline.shrink(cfg)
    pipeline.build_teacher_cache(cfg)
    graded = {"cache": 0, "live": 0}
    real = tr.distill_loss

    def spy(model, teacher, batch, cfg_, *a, **k):
        graded["cache" if isinstance(teacher, CachedTeacher) else "live"] += 1
        if isinstance(teacher, CachedTeacher):
            assert cfg_.alpha == recipe["train"].get("alpha", 0.5)  # the off-policy loss
        else:
            assert cfg_.alpha == 1.0 and cfg_.loss == "jsd"  # the on-policy loss, on sampled rows
        return real(model, teacher, batch, cfg_, *a, **k)

    monkeypatch.setattr(tr, "distill_loss", spy)
    pipeline.train_student(cfg)
    assert graded["cache"] > 0 and graded["live"] > 0
    summary = json.loads((cfg.run_dir / "train_summary.json").read_text())
    assert "graded by the live teacher" in summary["teacher_signal"]
    with pytest.raises(ValueError, match="onpolicy_fraction needs a teacher that grades"):
        load_config(None, ["train.onpolicy_fraction=0.5", "teacher.kind=openai", "teacher.api.model=m",
                           "student.init=model", "student.model=x"])  # fmt: skip


# --- an API teacher grading the student's samples ---------------------------------------------


def _grader(server, tok, k=3):
    from distill.core.config import ApiConfig
    from distill.teacher.api import ApiGrader

    cfg = ApiConfig(base_url=server.url, model="t", endpoint="completions", top_logprobs=k, max_retries=0,
                    api_key_env=None)  # fmt: skip
    return ApiGrader(cfg, tok)


def test_api_grader_reads_the_echoed_logprobs_of_given_tokens(setup):
    from fake_openai import FakeOpenAI

    _, tok, _ = setup
    with FakeOpenAI(tok=tok) as server:
        safe = server.safe_ids
        ids = [safe[3], safe[9], safe[4], safe[12], safe[5]]
        top_ids, top_lps = _grader(server, tok).score(ids)
        body = server.requests[-1]["body"]
    assert body["prompt"] == ids and body["echo"] is True and body["logprobs"] == 3
    assert body["return_tokens_as_token_ids"] is True  # vLLM then names tokens by id
    assert len(top_ids) == len(ids) - 1  # position t-1 predicts ids[t]
    for t in range(1, len(ids)):
        alts = [a for a in safe[:8] if a != ids[t]]
        if t % 2 == 0:  # the given token in the top, then two alternatives
            want = ([ids[t], alts[0], alts[1]], [-0.1, -2.0, -3.0])
        else:  # three alternatives, and the given token's own log-prob after them
            want = ([alts[0], alts[1], alts[2], ids[t]], [-2.0, -3.0, -4.0, -5.0])
        assert (top_ids[t - 1], top_lps[t - 1]) == want


def test_api_grader_signal_and_a_run_graded_by_the_api(setup, tmp_path):
    from fake_openai import FakeOpenAI

    teacher, tok, examples = setup
    with FakeOpenAI(tok=tok) as server:
        grader = _grader(server, tok)
        batch = tr.collate(examples[:3], tok.pad_token_id)
        sig = grader.signal(batch)
        assert sig.ids.shape == (3, batch.input_ids.shape[1] - 1, 4) and sig.tail == "bucket"
        first = batch.samples()[0]
        row = batch.input_ids[0, : first[2]].tolist()
        top_ids, _ = grader.score(row)
        assert sig.ids[0, 1, : len(top_ids[1])].tolist() == top_ids[1]
        # a whole run whose every row is on-policy: the API grades the student's samples
        student = shrink_layers(teacher, [0, 3])
        cfg = _cfg(alpha=0.0, onpolicy_fraction=1.0, max_steps=2, onpolicy_max_new_tokens=4)
        tr.train(student, None, examples, cfg, tmp_path, pad_id=0, onpolicy_teacher=grader)
        echoed = [r for r in server.requests if isinstance(r["prompt"], list)]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["onpolicy_rows"] > 0 and r["kd"] > 0 for r in rows)
    assert len(echoed) >= sum(r["onpolicy_rows"] for r in rows)


def test_api_grader_refuses_a_server_that_does_not_echo(setup):
    from types import SimpleNamespace

    from distill.core.config import ApiConfig
    from distill.teacher.api import ApiGrader
    from distill.teacher.api_client import ApiError

    _, tok, _ = setup
    plain = {"choices": [{"text": "x", "logprobs": None, "finish_reason": "length"}]}
    client = SimpleNamespace(completions=SimpleNamespace(create=lambda **kw: plain))
    cfg = ApiConfig(endpoint="completions", top_logprobs=2, api_key_env=None)
    with pytest.raises(ApiError, match="does not echo the log-probs of given tokens"):
        ApiGrader(cfg, tok, client=client).score([5, 6, 7])
    with pytest.raises(ApiError, match="endpoint=completions"):
        ApiGrader(ApiConfig(top_logprobs=2, api_key_env=None), tok)
