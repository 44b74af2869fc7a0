"""Offline teacher cache: exact round trip, resume after a kill, checksums, mismatch errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import distill.teacher.cache as C
from distill import pipeline
from distill.core.data import collate
from distill.core.recipe import load_config
from distill.teacher import factory

from conftest import random_examples, tiny_recipe


@pytest.fixture()
def setup(tiny_teacher_dir):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    examples = random_examples(len(tok), 9, 1, lambda i: 2 + i % 3, lambda i: 3 + (i * 5) % 6)
    meta = C.CacheMeta(
        teacher="tiny", teacher_weights_hash=C.weights_hash(tiny_teacher_dir),
        tokenizer_hash=C.tokenizer_hash(tok), vocab_size=len(tok), k=32, scoring_temperature=1.0,
        id_dtype="uint16", logprob_dtype="float16", samples_per_shard=4, num_samples=len(examples),
    )  # fmt: skip
    return teacher, tok, examples, meta


def _expected(meta):
    fields = ("teacher_weights_hash", "tokenizer_hash", "k", "scoring_temperature", "tail_samples")
    return {f: getattr(meta, f) for f in fields}


@torch.no_grad()
def _teacher_logprobs(teacher, batch):
    """The teacher's log-probs at the batch's shifted positions, computed here as the reference."""
    logits = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return torch.log_softmax(logits[:, :-1], -1)


def test_round_trip_matches_teacher_topk(setup, tmp_path):
    teacher, tok, examples, meta = setup
    C.build_cache(teacher, examples, tmp_path / "c", meta, pad_id=tok.pad_token_id, batch_size=3)
    assert sorted(p.name for p in (tmp_path / "c").glob("shard-*.safetensors")) == [
        "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors",
    ]  # fmt: skip
    cached = C.CachedTeacher(tmp_path / "c", _expected(meta), examples)
    batch = collate(examples[:4], tok.pad_token_id)
    sig = cached.signal(batch)
    logp = _teacher_logprobs(teacher, batch)
    mask = batch.answer_mask[:, 1:]
    want_vals, want_ids = logp[mask].topk(32, -1)
    assert torch.equal(sig.ids[mask], want_ids)
    torch.testing.assert_close(sig.logprobs[mask], want_vals.half().float(), rtol=0, atol=0)
    # The stored tail mass is what the top-k leaves out.
    _, _, tail = cached.rows[C.sample_key(examples[0][0])]
    row0 = logp[0][mask[0]]
    want_tail = torch.log1p(-row0.topk(32, -1).values.exp().sum(-1))
    torch.testing.assert_close(torch.from_numpy(tail.astype(np.float32)), want_tail, rtol=2e-3, atol=2e-3)


def test_tail_samples_round_trip(setup, tmp_path):
    """The cached tail samples lie outside the top-k, carry the teacher's log-probs, and are the
    same when the cache is built again in other batches (the draw is seeded by the sample)."""
    teacher, tok, examples, meta = setup
    meta = dataclasses.replace(meta, k=8, tail_samples=4)
    C.build_cache(teacher, examples, tmp_path / "a", meta, pad_id=tok.pad_token_id, batch_size=3)
    C.build_cache(teacher, examples[::-1], tmp_path / "b", meta, pad_id=tok.pad_token_id, batch_size=2)
    for shard in (tmp_path / "a").glob("shard-*.safetensors"):
        assert shard.read_bytes() == (tmp_path / "b" / shard.name).read_bytes()
    cached = C.CachedTeacher(tmp_path / "a", _expected(meta), examples, tail="sample")
    batch = collate(examples[:4], tok.pad_token_id)
    sig = cached.signal(batch)
    logp = _teacher_logprobs(teacher, batch)
    mask = batch.answer_mask[:, 1:]
    s_ids, s_lp = sig.sample_ids[mask], sig.sample_logprobs[mask]
    assert s_ids.shape == (int(mask.sum()), 4)
    assert not (s_ids[:, :, None] == sig.ids[mask][:, None, :]).any()
    torch.testing.assert_close(s_lp, logp[mask].gather(-1, s_ids).half().float(), rtol=0, atol=0)
    assert torch.isneginf(sig.sample_logprobs[~mask]).all()  # uncounted positions have none
    assert C.CachedTeacher(tmp_path / "a").tail == "sample"  # auto: the samples, when there are some
    # asking for a bucket gives the bucket signal from the same cache
    assert C.CachedTeacher(tmp_path / "a", tail="bucket").signal(batch).sample_ids is None
    C.build_cache(teacher, examples, tmp_path / "plain", dataclasses.replace(meta, tail_samples=0), pad_id=0)
    with pytest.raises(C.CacheError, match="holds no tail samples"):
        C.CachedTeacher(tmp_path / "plain", tail="sample")
    assert C.CachedTeacher(tmp_path / "plain").tail == "bucket"


def test_shards_are_memory_mapped_not_read_into_memory(setup, tmp_path):
    """The reader maps the shards and gives the rows safetensors' own reader gives, also when
    only one shard may stay mapped at a time."""
    from safetensors import safe_open

    teacher, tok, examples, meta = setup
    meta = dataclasses.replace(meta, tail_samples=2)
    C.build_cache(teacher, examples, tmp_path / "c", meta, pad_id=tok.pad_token_id)
    shards = sorted((tmp_path / "c").glob("shard-*.safetensors"))
    rows = C._ShardRows(shards, C._FIELDS, open_shards=1)
    want = {}
    for shard in shards:
        with safe_open(shard, "np") as f:
            arrays = [f.get_tensor(name) for name in C._FIELDS]
            for key, first, n in json.loads(f.metadata()["index"]):
                want[key] = [a[first : first + n] for a in arrays]
    assert sorted(rows) == sorted(want) == sorted({C.sample_key(ex[0]) for ex in examples})
    for key in list(want)[::-1] + list(want):  # back and forth across the shards
        got = rows[key]
        assert all(isinstance(a, np.memmap) for a in got)
        for a, b in zip(got, want[key], strict=True):
            assert a.dtype == b.dtype and np.array_equal(a, b)


def test_bytes_per_token_is_compact(setup, tmp_path):
    teacher, tok, _, meta = setup
    g = torch.Generator().manual_seed(2)
    examples = [
        (torch.randint(3, len(tok), (70,), generator=g).tolist(), [False] * 10 + [True] * 60)
        for _ in range(8)
    ]
    C.build_cache(teacher, examples, tmp_path / "c", meta, pad_id=tok.pad_token_id)
    tokens = sum(sum(m[1:]) for _, m in examples)
    size = sum(p.stat().st_size for p in (tmp_path / "c").glob("shard-*.safetensors"))
    assert size / tokens <= 150  # k = 32: 2-byte ids + 2-byte log-probs + tail, plus headers
    meta4 = dataclasses.replace(meta, tail_samples=4)
    C.build_cache(teacher, examples, tmp_path / "c4", meta4, pad_id=tok.pad_token_id)
    size4 = sum(p.stat().st_size for p in (tmp_path / "c4").glob("shard-*.safetensors"))
    assert size4 / tokens <= 150  # and 4 tail samples at 4 bytes each still fit
    assert tokens * 16 <= size4 - size <= tokens * 16 + 512  # 2-byte id + 2-byte log-prob each, + header


def test_resume_after_kill_mid_shard_keeps_finished_shards(setup, tmp_path, monkeypatch):
    teacher, tok, examples, meta = setup
    C.build_cache(teacher, examples, tmp_path / "full", meta, pad_id=tok.pad_token_id, batch_size=2)
    real, calls = C._score, {"n": 0}

    def killed(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # 2 batches a shard: dies inside the second shard
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(C, "_score", killed)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        C.build_cache(teacher, examples, out, meta, pad_id=tok.pad_token_id, batch_size=2)
    assert [p.name for p in out.glob("shard-*.safetensors")] == ["shard-00000.safetensors"]
    first = (out / "shard-00000.safetensors").stat()
    monkeypatch.setattr(C, "_score", real)
    C.build_cache(teacher, examples, out, meta, pad_id=tok.pad_token_id, batch_size=2)
    again = (out / "shard-00000.safetensors").stat()
    assert (first.st_ino, first.st_mtime_ns) == (again.st_ino, again.st_mtime_ns)  # not rewritten
    for name in ("shard-00000", "shard-00001", "shard-00002"):
        a = (tmp_path / "full" / f"{name}.safetensors").read_bytes()
        assert (out / f"{name}.safetensors").read_bytes() == a, name
    assert C.verify_cache(out) == []


def test_resuming_a_cache_begun_for_other_sequences_is_refused(setup, tmp_path):
    """Answers regenerated after a cache was begun: its finished shards hold the old sequences, so
    adding shards for the new ones would leave a cache with some of each."""
    teacher, tok, examples, meta = setup
    out = tmp_path / "c"
    C.build_cache(teacher, examples, out, meta, pad_id=tok.pad_token_id, batch_size=2)
    (out / "shard-00002.safetensors").unlink()  # as if killed before the last shard
    before = sorted(p.name for p in out.iterdir())
    changed = [examples[0], *examples[2:], random_examples(len(tok), 1, 7, lambda i: 4, lambda i: 5)[0]]
    assert len(changed) == len(examples)  # same count: only the sequences tell them apart
    with pytest.raises(C.CacheError, match="begun for other training sequences.*delete"):
        C.build_cache(teacher, changed, out, meta, pad_id=tok.pad_token_id)
    assert sorted(p.name for p in out.iterdir()) == before  # nothing added
    # the same sequences in another order resume it
    C.build_cache(teacher, examples[::-1], out, meta, pad_id=tok.pad_token_id)
    assert (out / "shard-00002.safetensors").is_file() and C.verify_cache(out) == []


def test_corrupted_shard_is_found_and_refused(setup, tmp_path):
    teacher, tok, examples, meta = setup
    C.build_cache(teacher, examples, tmp_path / "c", meta, pad_id=tok.pad_token_id)
    shard = tmp_path / "c" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = C.verify_cache(tmp_path / "c")
    assert len(problems) == 1 and "shard-00001" in problems[0] and "checksum mismatch" in problems[0]
    with pytest.raises(C.CacheError, match="(?s)damaged.*shard-00001"):
        C.CachedTeacher(tmp_path / "c", _expected(meta), examples)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("k", 16),
        ("scoring_temperature", 2.0),
        ("tokenizer_hash", "other"),
        ("teacher_weights_hash", "x"),
        ("tail_samples", 4),
    ],
)
def test_mismatch_names_the_field(setup, tmp_path, field, value):
    teacher, tok, examples, meta = setup
    C.build_cache(teacher, examples, tmp_path / "c", meta, pad_id=tok.pad_token_id)
    with pytest.raises(C.CacheError, match=f"{field}: cache has"):
        C.CachedTeacher(tmp_path / "c", {**_expected(meta), field: value}, examples)
    with pytest.raises(C.CacheError, match=f"{field}: cache has"):  # also when resuming a build
        C.build_cache(
            teacher, examples, tmp_path / "c", dataclasses.replace(meta, **{field: value}), pad_id=0
        )


def test_missing_sample_is_refused(setup, tmp_path):
    teacher, tok, examples, meta = setup
    C.build_cache(teacher, examples[:5], tmp_path / "c", meta, pad_id=tok.pad_token_id)
    with pytest.raises(C.CacheError, match="lacks 4 of 9 training samples"):
        C.CachedTeacher(tmp_path / "c", _expected(meta), examples)
    with pytest.raises(C.CacheError, match="not a teacher cache"):
        C.CachedTeacher(tmp_path / "nothing")


def test_pipeline_trains_from_cache_without_loading_the_teacher(
    tmp_path, tiny_teacher_dir, prompts_file, monkeypatch
):
    recipe = tiny_recipe(tmp_path / "runs", tiny_teacher_dir, prompts_file, cache={"use": True, "k": 8})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    cfg = load_config(tmp_path / "r.yaml")
    pipeline.generate(cfg)
    pipeline.shrink(cfg)
    pipeline.build_teacher_cache(cfg)

    def no_teacher(*a, **k):
        raise AssertionError("the teacher must not be loaded when training from the cache")

    monkeypatch.setattr(factory, "load_model", no_teacher)
    pipeline.train_student(cfg)
    assert (cfg.run_dir / "student" / "model.safetensors").is_file()
    assert pipeline.verify_teacher_cache(cfg) == []
    # A run that asks for a different k is refused before training starts.
    cfg2 = load_config(tmp_path / "r.yaml", ["cache.k=4"])
    with pytest.raises(C.CacheError, match="k: cache has 8, run needs 4"):
        pipeline.train_student(cfg2, resume=False)


def test_pipeline_trains_from_tail_samples(tmp_path, tiny_teacher_dir, prompts_file):
    cache = {"use": True, "k": 8, "tail": "sample", "tail_samples": 3}
    recipe = tiny_recipe(tmp_path / "runs", tiny_teacher_dir, prompts_file, cache=cache)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    cfg = load_config(tmp_path / "r.yaml")
    pipeline.generate(cfg)
    pipeline.shrink(cfg)
    pipeline.build_teacher_cache(cfg)
    meta = json.loads((cfg.run_dir / "teacher_cache" / "meta.json").read_text())
    assert (meta["k"], meta["tail_samples"]) == (8, 3)
    pipeline.train_student(cfg)
    summary = json.loads((cfg.run_dir / "train_summary.json").read_text())
    assert "tail: sample (3 samples)" in summary["teacher_signal"]
    assert all(np.isfinite(r["kd"]) for r in map(json.loads, (cfg.run_dir / "metrics.jsonl").open()))
    with pytest.raises(ValueError, match="train.loss=forward_kl"):
        load_config(tmp_path / "r.yaml", ["train.loss=reverse_kl"])
    with pytest.raises(ValueError, match="tail_samples > 0"):
        load_config(tmp_path / "r.yaml", ["cache.tail_samples=0"])
    # auto: samples for forward KL at temperature 1, else the bucket, else renormalising
    auto = ["cache.tail=auto"]
    assert factory.cache_tail(load_config(tmp_path / "r.yaml", auto)) == "auto"
    assert factory.cache_tail(load_config(tmp_path / "r.yaml", [*auto, "train.loss=jsd"])) == "bucket"
    hot = [*auto, "train.distill_temperature=2"]
    assert factory.cache_tail(load_config(tmp_path / "r.yaml", hot)) == "renormalize"


def test_a_training_start_hashes_only_shards_changed_since_their_last_check(setup, tmp_path, monkeypatch):
    """Defect 9: every start re-hashed every shard, a pass over the whole cache."""
    teacher, tok, examples, meta = setup
    C.build_cache(teacher, examples, tmp_path / "c", meta, pad_id=tok.pad_token_id)
    hashed = []
    real = C.file_sha256
    monkeypatch.setattr(C, "file_sha256", lambda p: hashed.append(p.name) or real(p))
    C.CachedTeacher(tmp_path / "c", _expected(meta), examples)
    assert len(hashed) == 3  # first start: each shard once
    hashed.clear()
    C.CachedTeacher(tmp_path / "c", _expected(meta), examples)
    assert hashed == []  # unchanged since: a stat per shard, no read
    shard = tmp_path / "c" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(C.CacheError, match="(?s)damaged.*shard-00001"):
        C.CachedTeacher(tmp_path / "c", _expected(meta), examples)
    assert hashed == ["shard-00001.safetensors"]
    hashed.clear()
    assert len(C.verify_cache(tmp_path / "c")) == 1 and len(hashed) == 3  # --verify reads every shard


def test_a_shard_is_checksummed_from_memory_not_read_back(setup, tmp_path, monkeypatch):
    """Writing a shard hashes the bytes it writes: no second pass over the file; the checksums still
    match the files."""
    teacher, tok, examples, meta = setup
    hashed = []
    real = C.file_sha256
    monkeypatch.setattr(C, "file_sha256", lambda p: hashed.append(p.name) or real(p))
    C.build_cache(teacher, examples, tmp_path / "c", meta, pad_id=tok.pad_token_id)
    assert hashed == []
    for shard in sorted((tmp_path / "c").glob("shard-*.safetensors")):
        assert shard.with_suffix(".sha256").read_text().strip() == real(shard)
