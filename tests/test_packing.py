"""Packing and length-grouped batching: the same samples give the same loss, with less padding."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.core.config import TrainConfig
from distill.core.data import collate, pack
from distill.student.prune import shrink_layers
from distill.teacher import cache as C
from distill.teacher.signal import LiveTeacher
from distill.train.loop import GROUP_SPAN, micro_batches, train
from distill.train.step import distill_loss

from conftest import random_examples


def examples(n: int = 10, vocab: int = 300, seed: int = 0):
    return random_examples(vocab, n, seed, lambda i: 3 + i % 4, lambda i: 4 + (7 * i) % 13)


def test_pack_places_every_sample_once_with_its_own_positions():
    exs = examples(9)
    b = pack(exs, pad_id=0, max_len=32)
    assert b.input_ids.shape[1] <= 32 and b.input_ids.shape[0] < len(exs)
    seen = []
    for row, start, n in b.samples():
        ids = b.input_ids[row, start : start + n].tolist()
        seen.append(ids)
        assert b.position_ids[row, start : start + n].tolist() == list(range(n))
        assert b.attention_mask[row, start : start + n].all()
        assert b.answer_mask[row, start : start + n].tolist() == exs[[e[0] for e in exs].index(ids)][1]
    assert sorted(seen) == sorted(e[0] for e in exs)
    assert int(b.attention_mask.sum()) == sum(len(e[0]) for e in exs)
    assert b.num_target_tokens == collate(exs, 0).num_target_tokens
    with pytest.raises(ValueError, match="does not fit"):
        pack(exs, 0, max_len=5)


@pytest.fixture(scope="module")
def models(tiny_teacher_dir):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32).eval()
    student = shrink_layers(teacher, [0, 3])
    return teacher, student


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("source", ["live", "cache"])
def test_packed_loss_and_gradients_equal_unpacked(models, tmp_path, chunked, source):
    teacher, student = models
    exs = examples(10)
    if source == "live":
        signal = LiveTeacher(teacher)
    else:
        meta = C.CacheMeta(teacher="t", teacher_weights_hash="w", tokenizer_hash="h", vocab_size=300, k=8,
                           scoring_temperature=1.0, id_dtype="uint16", logprob_dtype="float16",
                           samples_per_shard=4, num_samples=len(exs))  # fmt: skip
        C.build_cache(teacher, exs, tmp_path / "c", meta, pad_id=0)
        signal = C.CachedTeacher(tmp_path / "c", examples=exs)
    cfg = TrainConfig(alpha=0.5, dtype="float32", chunked_loss=chunked, loss="forward_kl")
    results = []
    for batch in (collate(exs, 0), pack(exs, 0, max_len=40)):
        student.zero_grad()
        out = distill_loss(student, signal, batch, cfg, num_tokens=batch.num_target_tokens, vocab_size=300)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in student.named_parameters()}))
    (plain, g_plain), (packed, g_packed) = results
    assert packed.loss.item() == pytest.approx(plain.loss.item(), rel=1e-5)
    assert packed.kd == pytest.approx(plain.kd, rel=1e-5) and packed.ce == pytest.approx(plain.ce, rel=1e-5)
    for name in g_plain:
        torch.testing.assert_close(g_packed[name], g_plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_without_position_ids_packed_samples_would_see_each_other(models):
    """The equality above is not an accident: attending across samples changes the loss."""
    teacher, student = models
    exs = examples(6)
    cfg = TrainConfig(alpha=0.0, dtype="float32", chunked_loss=False)
    packed = pack(exs, 0, max_len=64)
    leaky = collate([(packed.input_ids[r].tolist(), packed.answer_mask[r].tolist()) for r in range(2)], 0)
    honest = pack(exs, 0, max_len=64)
    with torch.no_grad():
        a = distill_loss(student, None, honest, cfg, num_tokens=honest.num_target_tokens).loss
        b = distill_loss(student, None, leaky, cfg, num_tokens=leaky.num_target_tokens).loss
    assert packed.input_ids.shape[0] == 2 and abs(a.item() - b.item()) > 1e-3


def test_group_by_length_regroups_the_same_samples_with_less_padding():
    exs = random_examples(300, 200, 1, lambda i: 4, lambda i: 2 + (37 * i) % 60)
    plain_cfg = TrainConfig(batch_size=4, grad_accum=2, max_seq_len=128, group_by_length=False)
    grouped_cfg = plain_cfg.model_copy(update={"group_by_length": True})
    steps = GROUP_SPAN  # one span of steps

    def batches(cfg, rank=0, world=1):
        return [b for s in range(steps) for b in micro_batches(exs, s, cfg, 0, rank, world)]

    def key(b):
        return sorted(tuple(r) for r in b.input_ids.tolist())

    plain, grouped = batches(plain_cfg), batches(grouped_cfg)
    as_set = lambda bs: sorted(tuple(x for x in r if x) for b in bs for r in b.input_ids.tolist())  # noqa: E731
    assert as_set(plain) == as_set(grouped)  # the same samples, regrouped
    pad = lambda bs: sum(int((1 - b.attention_mask).sum()) for b in bs)  # noqa: E731
    assert pad(grouped) < 0.25 * pad(plain)
    lengths = [len({int(n) for n in b.attention_mask.sum(1)}) for b in grouped]
    assert sum(lengths) < sum(len({int(n) for n in b.attention_mask.sum(1)}) for b in plain)
    # two processes with half the batch each see exactly the rows one process sees
    one = batches(grouped_cfg.model_copy(update={"batch_size": 8}))
    two = [batches(grouped_cfg, rank=r, world=2) for r in (0, 1)]
    for b1, b_r0, b_r1 in zip(one, *two, strict=True):
        rows = [r[: int(m.sum())] for r, m in zip(b1.input_ids.tolist(), b1.attention_mask, strict=True)]
        rows_r = [
            r[: int(m.sum())]
            for b in (b_r0, b_r1)
            for r, m in zip(b.input_ids.tolist(), b.attention_mask, strict=True)
        ]
        assert rows == rows_r
    assert key(grouped[0]) != key(plain[0])


def test_training_with_packing_follows_the_unpacked_run(models, tmp_path):
    teacher, _ = models
    exs = examples(24)
    losses = {}
    for packing in (False, True):
        student = shrink_layers(teacher, [0, 3])
        cfg = TrainConfig(max_steps=4, batch_size=6, warmup_steps=1, lr=1e-3, dtype="float32",
                          packing=packing, max_seq_len=64, checkpoint_every=100,
                          tensorboard=False)  # fmt: skip
        out = tmp_path / str(packing)
        train(student, LiveTeacher(teacher), exs, cfg, out, pad_id=0, vocab_size=300)
        losses[packing] = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_the_declared_torch_floor_is_one_packing_works_with():
    """Defect 5: pyproject allowed torch >= 2.4 while the packed mask needs >= 2.6."""
    import re
    from pathlib import Path

    from distill.core.data import PACKING_MIN_TORCH

    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    floor = tuple(int(x) for x in re.search(r'"torch>=(\d+)\.(\d+)', text).groups())
    assert floor >= PACKING_MIN_TORCH


def test_packing_refuses_an_older_torch(monkeypatch):
    from distill.core import data

    monkeypatch.setattr(data.torch, "__version__", "2.5.1+cpu")
    with pytest.raises(ValueError, match="needs torch >= 2.6"):
        data.pack([([1, 2], [False, True])], 0, 8)
