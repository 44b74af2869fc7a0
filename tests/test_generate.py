"""Teacher generation: answers written as they finish, resume after a kill, no duplicates."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import distill.teacher.generate as gen
from distill.core.answers import write_records
from distill.core.config import GenerateConfig
from distill.core.data import read_prompts


@pytest.fixture()
def teacher(tiny_teacher_dir):
    return (
        AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval(),
        AutoTokenizer.from_pretrained(tiny_teacher_dir),
    )


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_answers_are_cut_at_eos_and_records_complete(teacher, prompts_file, tmp_path):
    model, tok = teacher
    prompts = read_prompts(prompts_file)
    out = gen.generate_answers(
        model, tok, prompts, tmp_path / "a.jsonl", GenerateConfig(max_new_tokens=10, batch_size=5)
    )
    assert set(out) == {p.id for p in prompts}
    for rec in out.values():
        ids = rec["token_ids"]
        assert 1 <= len(ids) <= 10
        if rec["finish_reason"] == "stop":
            assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1]
        else:
            assert len(ids) == 10 and tok.eos_token_id not in ids
        assert rec["text"] == tok.decode(ids, skip_special_tokens=True)


def test_batched_left_padding_matches_one_by_one(teacher, prompts_file):
    from distill.core.data import prompt_token_ids

    model, tok = teacher
    rows = [prompt_token_ids(tok, p) for p in read_prompts(prompts_file)[:4]]
    rows[0] = rows[0] + rows[0]  # unequal lengths force padding
    batched = gen.generate_batch(model, tok, rows, max_new_tokens=6)
    single = [gen.generate_batch(model, tok, [r], max_new_tokens=6)[0] for r in rows]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]


def test_resume_after_kill_has_no_duplicates_and_equals_uninterrupted(
    teacher, prompts_file, tmp_path, monkeypatch
):
    model, tok = teacher
    prompts = read_prompts(prompts_file)
    cfg = GenerateConfig(max_new_tokens=8, batch_size=3)
    full = gen.generate_answers(model, tok, prompts, tmp_path / "full.jsonl", cfg)

    real, calls = gen.generate_batch, {"n": 0}

    def dies_on_third_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(gen, "generate_batch", dies_on_third_batch)
    path = tmp_path / "resumed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        gen.generate_answers(model, tok, prompts, path, cfg)
    assert len(_lines(path)) == 6  # two finished batches are on disk
    with path.open("a") as f:
        f.write('{"id": "torn')  # a write cut off by the kill
    monkeypatch.setattr(gen, "generate_batch", real)
    resumed = gen.generate_answers(model, tok, prompts, path, cfg)
    recs = _lines(path)
    assert len(recs) == len(prompts) and len({r["id"] for r in recs}) == len(prompts)
    assert {k: v["token_ids"] for k, v in resumed.items()} == {k: v["token_ids"] for k, v in full.items()}


def test_answers_with_unicode_line_breaks_read_back_whole(tmp_path):
    """JSON lines are split at \\n only: a teacher's text may hold U+2028, U+2029 or U+0085, which
    json.dumps(ensure_ascii=False) writes raw and str.splitlines() breaks at (Gemma wrote a U+2028
    into a sampled review answer); control characters such as \\x1c are escaped by json."""
    texts = ["Service staff \u2028friendly", "a\u0085b\u2029c", "x\x1cy\x0bz\x0c", "plain"]
    path = tmp_path / "answers.jsonl"
    with path.open("a") as f:
        write_records(f, [{"id": f"p{i}", "text": t, "token_ids": [i]} for i, t in enumerate(texts)])
    got = gen.read_answers(path)
    assert [got[f"p{i}"]["text"] for i in range(len(texts))] == texts
    with path.open("a") as f:
        f.write('{"id": "p9", "text": "\u2028 torn')  # a torn last line is still cut off
    assert len(gen.read_answers(path)) == len(texts) and path.read_bytes().endswith(b"\n")


def test_sampled_generation_is_seeded(teacher, prompts_file, tmp_path):
    model, tok = teacher
    prompts = read_prompts(prompts_file)[:4]
    cfg = GenerateConfig(max_new_tokens=8, batch_size=2, do_sample=True, generation_temperature=1.5, seed=7)
    a = gen.generate_answers(model, tok, prompts, tmp_path / "a.jsonl", cfg)
    b = gen.generate_answers(model, tok, prompts, tmp_path / "b.jsonl", cfg)
    assert {k: v["token_ids"] for k, v in a.items()} == {k: v["token_ids"] for k, v in b.items()}


def test_sampling_draws_from_the_whole_distribution_not_a_default_cut(teacher, prompts_file, tmp_path):
    """A model's generation config may cut sampling to its top k (Gemma ships 64, transformers' own
    default is 50); distill samples from the whole distribution, as its llama.cpp engine does. A
    config cut to top-1 would make every 'sampled' answer the greedy one."""
    model, tok = teacher
    model.generation_config.top_k = 1
    prompts = read_prompts(prompts_file)[:4]
    greedy = gen.generate_answers(model, tok, prompts, tmp_path / "g.jsonl", GenerateConfig(max_new_tokens=8))
    cfg = GenerateConfig(max_new_tokens=8, batch_size=2, do_sample=True, generation_temperature=1.5, seed=7)
    sampled = gen.generate_answers(model, tok, prompts, tmp_path / "s.jsonl", cfg)
    assert model.generation_config.top_k == 1  # the model's own setting is left as it was
    differ = [k for k in greedy if greedy[k]["token_ids"] != sampled[k]["token_ids"]]
    assert len(differ) >= 3, differ


def test_extra_samples_beside_the_greedy_answer(teacher, prompts_file, tmp_path):
    """The first answer stays the greedy one; the prompts asked for get extra sampled answers,
    keyed apart, and a file grown from greedy-only answers ends equal to one written at once."""
    from distill.core.answers import answer_key

    model, tok = teacher
    prompts = read_prompts(prompts_file)[:5]
    greedy = gen.generate_answers(model, tok, prompts, tmp_path / "g.jsonl", GenerateConfig(max_new_tokens=8))
    cfg = GenerateConfig(max_new_tokens=8, batch_size=2, extra_samples=2, generation_temperature=1.5, seed=3)
    sampled = {p.id for p in prompts[:3]}
    once = gen.generate_answers(model, tok, prompts, tmp_path / "once.jsonl", cfg, sampled=sampled)
    assert len(once) == 5 + 2 * 3
    for p in prompts:
        assert once[answer_key(p.id)]["token_ids"] == greedy[p.id]["token_ids"]
        assert "sample" not in once[answer_key(p.id)]
        for j in (1, 2):
            key = answer_key(p.id, j)
            assert (key in once) == (p.id in sampled)
            if key in once:
                assert once[key]["id"] == p.id and once[key]["sample"] == j
    draws = {(i, j): once[answer_key(i, j)]["token_ids"] for i in sampled for j in (1, 2)}
    differ = [ij for ij, ids in draws.items() if ids != greedy[ij[0]]["token_ids"]]
    assert len(differ) >= 4, differ
    grown = tmp_path / "grown.jsonl"
    gen.generate_answers(model, tok, prompts, grown, GenerateConfig(max_new_tokens=8, batch_size=2))
    after = gen.generate_answers(model, tok, prompts, grown, cfg, sampled=sampled)
    assert {k: v["token_ids"] for k, v in after.items()} == {k: v["token_ids"] for k, v in once.items()}
    assert len(_lines(grown)) == len(once)  # only the samples were added


def test_resampling_draws_until_an_answer_passes_the_filter_and_resumes(teacher, prompts_file, tmp_path):
    """generate.resample: a prompt whose greedy answer the filter drops gets sampled answers, one per
    round, up to the first that passes (or the round limit); a prompt that passes gets none, and a
    rerun draws nothing more. The filter then keeps, for each prompt, the answer that passed."""
    from distill.core.answers import answer_key
    from distill.core.config import FilterConfig
    from distill.teacher.filters import filter_answers, rejection

    model, tok = teacher
    prompts = read_prompts(prompts_file)
    out = tmp_path / "answers.jsonl"
    greedy = gen.generate_answers(model, tok, prompts, out, GenerateConfig(max_new_tokens=12, batch_size=4))
    lengths = sorted(len(a["text"]) for a in greedy.values())
    keep = FilterConfig(max_chars=lengths[len(lengths) // 2])  # about half the greedy answers fail
    cfg = GenerateConfig(max_new_tokens=12, batch_size=4, resample=4, generation_temperature=1.5, seed=5)
    done = gen.resample_answers(model, tok, prompts, out, cfg, keep)
    rescued = 0
    for p in prompts:
        mine = [done[answer_key(p.id, j)] for j in range(5) if answer_key(p.id, j) in done]
        assert [a.get("sample", 0) for a in mine] == list(range(len(mine)))
        passes = [rejection(a, p, keep, set()) is None for a in mine]
        assert not any(passes[:-1]), (p.id, passes)  # sampling stopped at the first that passed
        assert passes[-1] or len(mine) == 5, (p.id, passes)  # or the rounds ran out
        rescued += len(mine) > 1 and passes[-1]
    assert rescued >= 2 and 0 < sum(len(a["text"]) > keep.max_chars for a in greedy.values()) < len(prompts)
    lines = len(_lines(out))
    assert lines == len(done) and gen.resample_answers(model, tok, prompts, out, cfg, keep) == done
    assert len(_lines(out)) == lines  # a rerun finds every round's answers
    last = max(a.get("sample", 0) for a in done.values())  # a run killed before its last round
    out.write_text("".join(json.dumps(a) + "\n" for a in _lines(out) if a.get("sample", 0) < last))
    again = gen.resample_answers(model, tok, prompts, out, cfg, keep)
    assert {k: a["token_ids"] for k, a in again.items()} == {k: a["token_ids"] for k, a in done.items()}
    kept, report = filter_answers(prompts, done, keep, resample_from=1)
    assert len({p.id for p, _ in kept}) == len(kept) and report["kept_by_resampling"] == rescued
