"""The training loop: learns, resumes bit for bit, stops on a non-finite loss."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import distill.train as tr
from distill.config import TrainConfig
from distill.models import shrink_layers
from distill.teacher import LiveTeacher

from conftest import random_examples


@pytest.fixture()
def setup(tiny_teacher_dir):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    examples = random_examples(len(tok), 10, 0, lambda i: 3 + i % 4, lambda i: 4 + (i * 3) % 7)
    return teacher, tok, examples


def _cfg(**kw):
    base = dict(max_steps=6, batch_size=3, grad_accum=2, warmup_steps=1, lr=5e-3,
                checkpoint_every=2, keep_checkpoints=2, dtype="float32")  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _student(teacher):
    return shrink_layers(teacher, [0, 3])


def test_loss_goes_down_and_metrics_are_logged(setup, tmp_path):
    teacher, tok, examples = setup
    student = _student(teacher)
    summary = tr.train(
        student, LiveTeacher(teacher), examples, _cfg(max_steps=12), tmp_path, pad_id=tok.pad_token_id
    )
    assert summary["steps"] == 12 and summary["last_loss"] < summary["first_loss"]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert {"loss", "kd", "ce", "lr", "grad_norm", "tokens_per_s"} <= rows[0].keys()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000010", "step-000012"]


def test_kill_and_resume_gives_identical_weights(setup, tmp_path, monkeypatch):
    teacher, tok, examples = setup
    student_a = _student(teacher)
    tr.train(student_a, LiveTeacher(teacher), examples, _cfg(), tmp_path / "a", pad_id=tok.pad_token_id)

    real, calls = tr.distill_loss, {"n": 0}

    def killed_in_step_four(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:  # 2 micro-batches a step: the first of step 4
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tr, "distill_loss", killed_in_step_four)
    with pytest.raises(KeyboardInterrupt):
        tr.train(
            _student(teacher), LiveTeacher(teacher), examples, _cfg(), tmp_path / "b", pad_id=tok.pad_token_id
        )
    assert tr.latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step-000002"
    monkeypatch.setattr(tr, "distill_loss", real)
    student_b = _student(teacher)  # a fresh process would start from the initial weights
    summary = tr.train(
        student_b, LiveTeacher(teacher), examples, _cfg(), tmp_path / "b", pad_id=tok.pad_token_id
    )
    assert summary["steps"] == 6
    for (name, a), (_, b) in zip(student_a.state_dict().items(), student_b.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    # the optimizer that resumed is the fused AdamW (one kernel a step), its state restored
    state = torch.load(tmp_path / "b" / "checkpoints" / "step-000006" / "optimizer.pt", weights_only=True)
    assert all(g["fused"] for g in state["param_groups"]) and len(state["state"]) > 0


def test_gradient_accumulation_equals_one_big_batch(setup, tmp_path):
    teacher, tok, examples = setup
    big, small = _student(teacher), _student(teacher)
    for student, batch_size, accum in ((big, 6, 1), (small, 3, 2)):
        cfg = _cfg(max_steps=2, batch_size=batch_size, grad_accum=accum)
        tr.train(student, LiveTeacher(teacher), examples, cfg, tmp_path / str(accum), pad_id=tok.pad_token_id)
    # Adam divides by sqrt(v): a near-zero gradient's rounding (other micro-batch padding, other
    # loss blocks) can move one weight by ~1e-4, so single weights get atol 1e-3 and the whole
    # tensor must agree to 1e-3 relative; a step that saw other samples moves most weights by ~lr.
    for a, b in zip(big.parameters(), small.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
        assert float((a - b).norm() / a.norm()) < 1e-3


class _NaNTeacher:
    def __init__(self, teacher, bad_from_call):
        self.live, self.calls, self.bad = LiveTeacher(teacher), 0, bad_from_call

    def signal(self, batch, lazy=False):
        self.calls += 1
        out = self.live.signal(batch)
        return out * float("nan") if self.calls >= self.bad else out


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(setup, tmp_path):
    teacher, tok, examples = setup
    with pytest.raises(
        tr.TrainingError, match=r"non-finite loss at step 5 \(kd=nan.*last good checkpoint: .*step-000004"
    ):
        tr.train(
            _student(teacher), _NaNTeacher(teacher, 9), examples, _cfg(), tmp_path, pad_id=tok.pad_token_id
        )
    assert tr.latest_checkpoint(tmp_path / "checkpoints").name == "step-000004"


def test_lr_schedule():
    cfg = _cfg(max_steps=100, warmup_steps=10, lr=1.0)
    assert tr.lr_at(0, cfg) == pytest.approx(0.1) and tr.lr_at(9, cfg) == pytest.approx(1.0)
    assert tr.lr_at(10, cfg) == pytest.approx(1.0) and tr.lr_at(100, cfg) == pytest.approx(0.1)
    assert tr.lr_at(55, cfg) == pytest.approx(0.55)


def test_unknown_loss_and_empty_data(setup, tmp_path):
    teacher, tok, examples = setup
    with pytest.raises(tr.TrainingError, match="is not one of"):
        tr.train(_student(teacher), LiveTeacher(teacher), examples, _cfg(loss="kl"), tmp_path, pad_id=0)
    with pytest.raises(tr.TrainingError, match="no training examples"):
        tr.train(_student(teacher), LiveTeacher(teacher), [], _cfg(), tmp_path, pad_id=0)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("sparse", [False, True])
def test_chunked_loss_path_equals_plain(setup, alpha, sparse):
    teacher, tok, examples = setup
    batch = tr.collate(examples[:4], tok.pad_token_id)
    live = LiveTeacher(teacher)

    class TopK:  # a sparse teacher signal, as the offline cache gives
        def signal(self, b, lazy=False):
            lp = torch.log_softmax(live.signal(b).float(), -1)
            vals, ids = lp.topk(16, -1)
            return tr.TopKTeacher(ids, vals, "bucket")

    signal = TopK() if sparse else live
    n = batch.num_target_tokens
    results = []
    for chunked in (False, True):
        student = _student(teacher)
        cfg = _cfg(alpha=alpha, chunked_loss=chunked)
        out = tr.distill_loss(student, signal, batch, cfg, n)
        out.loss.backward()
        grads = {k: p.grad.clone() for k, p in student.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (plain, g_plain), (chunk, g_chunk) = results
    torch.testing.assert_close(chunk.loss, plain.loss)
    assert chunk.kd == pytest.approx(plain.kd, rel=1e-5) and chunk.ce == pytest.approx(plain.ce, rel=1e-5)
    assert g_plain.keys() == g_chunk.keys() and g_plain
    for k in g_plain:
        torch.testing.assert_close(g_chunk[k], g_plain[k], rtol=1e-4, atol=1e-6, msg=k)


def test_live_teacher_lazy_logits_are_its_logits(setup):
    """For a chunked loss the live teacher hands over hidden states and its head (``HeadRows``),
    whose rows make exactly its logits; a model whose logits are not its head's output (here
    soft-capped) is caught by the first call's check and keeps giving plain logits."""
    from distill.teacher import HeadRows

    teacher, tok, examples = setup
    batch = tr.collate(examples[:4], tok.pad_token_id)
    live = LiveTeacher(teacher)
    full = live.signal(batch)
    first, later = live.signal(batch, lazy=True), live.signal(batch, lazy=True)
    assert isinstance(first, HeadRows) and isinstance(later, HeadRows)
    torch.testing.assert_close(later.logits(), full, rtol=1e-5, atol=1e-5)
    rows = torch.tensor([0, 5, 9, 17])
    want = full.reshape(-1, full.shape[-1])[rows]
    torch.testing.assert_close(later.flat().take(rows).logits(), want, rtol=1e-5, atol=1e-5)

    plain_forward = teacher.forward

    def capped(*args, **kwargs):
        out = plain_forward(*args, **kwargs)
        out.logits = torch.tanh(out.logits / 2) * 2
        return out

    teacher.forward = capped
    capped_live = LiveTeacher(teacher)
    for _ in range(2):
        got = capped_live.signal(batch, lazy=True)
        assert isinstance(got, torch.Tensor)
        torch.testing.assert_close(got, torch.tanh(full / 2) * 2)
