"""The training loop: learns, resumes bit for bit, stops on a non-finite loss."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import distill.train.loop as tr
from distill import losses as L
from distill.core.config import TrainConfig
from distill.student.prune import shrink_layers
from distill.teacher.signal import LiveTeacher
from distill.train import checkpoint, step

from conftest import random_examples


@pytest.fixture()
def setup(tiny_training):
    return tiny_training


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


def test_frozen_embeddings_keep_their_values_and_the_rest_trains(setup, tmp_path):
    teacher, tok, examples = setup
    student = _student(teacher)
    assert student.get_input_embeddings().weight is student.get_output_embeddings().weight  # tied
    before = {k: v.clone() for k, v in student.state_dict().items()}
    summary = tr.train(student, LiveTeacher(teacher), examples, _cfg(max_steps=4, freeze_embeddings=True),
                       tmp_path, pad_id=tok.pad_token_id)  # fmt: skip
    assert summary["steps"] == 4
    after = student.state_dict()
    embed = "model.embed_tokens.weight"
    assert torch.equal(after[embed], before[embed])
    moved = [k for k in before if k not in (embed, "lm_head.weight") and not torch.equal(after[k], before[k])]
    assert any("layers.0.mlp" in k for k in moved) and any("self_attn" in k for k in moved)
    # the checkpoint holds the full student, the frozen weights included
    ckpt = tr.latest_checkpoint(tmp_path / "checkpoints")
    saved = load_file(ckpt / "model.safetensors")
    assert torch.equal(saved[embed], before[embed])


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
        tr.TrainingError,
        match=r"non-finite loss at step 5 \(loss=nan.*not applied; last good checkpoint: .*step-000004",
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
    wsd = _cfg(max_steps=100, warmup_steps=10, lr=1.0, lr_schedule="wsd")  # decays over the last 18 steps
    assert tr.lr_at(5, wsd) == pytest.approx(0.6) and tr.lr_at(82, wsd) == pytest.approx(1.0)
    assert tr.lr_at(91, wsd) == pytest.approx(0.55) and tr.lr_at(100, wsd) == pytest.approx(0.1)
    const = _cfg(max_steps=100, warmup_steps=10, lr=1.0, lr_schedule="constant")
    assert tr.lr_at(5, const) == pytest.approx(0.6) and tr.lr_at(99, const) == 1.0


def test_unknown_loss_and_empty_data(setup, tmp_path):
    teacher, tok, examples = setup
    with pytest.raises(ValueError, match="unknown loss"):  # refused when the config is made, before any work
        _cfg(loss="kl")
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
            return L.TopKTeacher(ids, vals, "bucket")

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
    from distill.teacher.signal import HeadRows

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


# --- review defects and the time budget --------------------------------------------------------


def _steps_logged(folder):
    return [json.loads(x)["step"] for x in (folder / "metrics.jsonl").read_text().splitlines()]


def test_a_fresh_start_removes_the_old_runs_checkpoints(setup, tmp_path):
    """Defect 3: --no-resume left old step-* checkpoints; rotation by name then deleted the new
    run's and a later resume loaded the old run's weights."""
    teacher, tok, examples = setup
    tr.train(
        _student(teacher),
        LiveTeacher(teacher),
        examples,
        _cfg(max_steps=6),
        tmp_path,
        pad_id=tok.pad_token_id,
    )
    fresh = _student(teacher)
    tr.train(fresh, LiveTeacher(teacher), examples, _cfg(max_steps=2, lr=1e-3), tmp_path,
             pad_id=tok.pad_token_id, resume=False)  # fmt: skip
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000002"]
    assert _steps_logged(tmp_path) == [1, 2]
    # a later resume continues the new run, not the old one
    saved = load_file(tmp_path / "checkpoints" / "step-000002" / "model.safetensors")
    for k, v in fresh.state_dict().items():
        if k in saved:
            assert torch.equal(saved[k], v), k


def test_a_resumed_run_logs_each_step_once(setup, tmp_path):
    """Defect 8: steps between the last checkpoint and the kill were logged twice."""
    teacher, tok, examples = setup
    cfg = _cfg(max_steps=5, checkpoint_every=2, keep_checkpoints=5)
    tr.train(_student(teacher), LiveTeacher(teacher), examples, cfg, tmp_path, pad_id=tok.pad_token_id)
    import shutil

    shutil.rmtree(
        tmp_path / "checkpoints" / "step-000005"
    )  # killed after logging step 5, before its checkpoint
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "loss": 1.0}\n{"step": 7, "lo')  # and a torn line
    tr.train(_student(teacher), LiveTeacher(teacher), examples, cfg, tmp_path, pad_id=tok.pad_token_id)
    assert _steps_logged(tmp_path) == [1, 2, 3, 4, 5]


def test_a_non_finite_gradient_norm_never_reaches_the_weights(setup, tmp_path):
    """Defect 4: only the loss was checked; a NaN gradient with a finite loss was stepped."""
    teacher, tok, examples = setup
    student = _student(teacher)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    student.model.layers[0].mlp.down_proj.weight.register_hook(lambda g: g * float("nan"))
    with pytest.raises(tr.TrainingError, match=r"non-finite gradient norm at step 1 \(loss=\d.*not applied"):
        tr.train(student, LiveTeacher(teacher), examples, _cfg(), tmp_path, pad_id=tok.pad_token_id)
    for k, v in student.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize(
    ("loss", "kw", "option"),
    [("jsd", {"jsd_beta": 0.3}, {"beta": 0.3}), ("skew_reverse_kl", {"skew": 0.2}, {"alpha": 0.2})],
)
def test_jsd_beta_and_skew_come_from_the_config(loss, kw, option):
    """Defect 11: beta and the skew could not be set, and alpha meant both the KD weight and the skew."""
    from distill import losses as L

    cfg = _cfg(loss=loss, alpha=0.7, **kw)
    assert step.loss_options(cfg) == option
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 5, 30, generator=g), torch.randn(2, 5, 30, generator=g)
    labels, mask = torch.randint(0, 30, (2, 5), generator=g), torch.ones(2, 5, dtype=torch.bool)
    parts = {"kd": 0.0, "ce": 0.0}
    step.kd_ce_loss(cfg, None, parts)(s, step.Targets(t, labels), mask, num_tokens=10)
    assert parts["kd"] == pytest.approx(float(L.LOSSES[loss](s, t, mask, num_tokens=10, **option)), rel=1e-6)


def test_the_chunked_loss_refuses_a_model_with_an_unknown_logit_transform(setup):
    teacher, tok, examples = setup
    student = _student(teacher)
    batch = tr.collate(examples[:2], tok.pad_token_id)
    tr.check_chunked_head(student, batch)  # a plain Llama head: fine
    student.lm_head.register_forward_hook(lambda _m, _i, out: out * 2)  # a transform no config declares
    with pytest.raises(tr.TrainingError, match="chunked_loss=false"):
        tr.check_chunked_head(student, batch)


def test_a_softcapped_model_trains_through_the_chunked_loss(tmp_path):
    """A Gemma 2 student (final-logit soft-capping): chunked and plain losses give the same gradients."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                       final_logit_softcapping=2.0)  # fmt: skip
    student = Gemma2ForCausalLM(cfg)
    with torch.no_grad():
        student.lm_head.weight.mul_(40)  # logits large enough that the cap bites
    examples = random_examples(64, 4, 1, lambda i: 3, lambda i: 5)
    batch = tr.collate(examples, 0)
    tr.check_chunked_head(student, batch)
    teacher_logits = torch.randn(4, batch.input_ids.shape[1], 64) * 3

    class Fixed:
        def signal(self, b, lazy=False):
            return teacher_logits[:, :-1]

    grads = []
    for chunked in (False, True):
        student.zero_grad()
        c = _cfg(chunked_loss=chunked, fused_loss=False)
        tr.distill_loss(student, Fixed(), batch, c, batch.num_target_tokens).loss.backward()
        grads.append(student.lm_head.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    assert float(grads[0].abs().max()) > 0


def test_time_plan_fits_the_budget_and_respects_max_steps():
    cfg = _cfg(max_steps=100, time_budget="10s")
    plan = tr.TimePlan.fit(cfg, 3, [0.5, 0.5], spent=2.0)  # 8 s left at 0.5 s a step
    assert plan.max_steps == 3 + 16 and not plan.capped
    assert tr.TimePlan.fit(_cfg(max_steps=10, time_budget="1h"), 3, [0.5], 2.0).max_steps == 10
    assert tr.TimePlan.fit(cfg, 3, [0.5], spent=30.0).max_steps == 3  # over budget already: stop here
    assert "19 steps" in plan.describe("10s")


def test_a_refit_sets_the_step_count_the_time_left_allows_within_max_steps():
    cfg = _cfg(max_steps=100, time_budget="10s")
    plan = tr.TimePlan.fit(cfg, 3, [0.1, 0.1], spent=0.3)
    assert plan.max_steps == 100 and plan.capped  # 9.7 s left at 0.1 s a step: the bound holds
    later = plan.refit(cfg, 20, [0.5] * 10, spent=4.0, sampled_in_steps=0.0, sampled_calls=0)
    assert later.max_steps == 20 + 12 and not later.capped  # 6 s left at 0.5 s a step
    assert (later.first_max_steps, later.refits, later.measured_steps) == (100, 1, plan.measured_steps)
    faster = later.refit(cfg, 30, [0.125] * 10, spent=5.0, sampled_in_steps=0.0, sampled_calls=0)
    assert faster.max_steps == 30 + 40 and faster.refits == 2 and faster.first_max_steps == 100
    assert later.refit(cfg, 30, [0.01] * 10, 5.0, 0.0, 0).max_steps == 100  # never past max_steps


def test_steps_that_slow_down_after_the_plan_stop_within_the_budget(setup, tmp_path, monkeypatch):
    """A fake clock: each step costs 0.05 s while the plan times them, 0.15 s after. The first plan
    allows all 60 steps (8.7 s in all); the refits stop the run within its 6 s."""
    teacher, tok, examples = setup
    clock = {"now": 0.0, "calls": 0}
    loss = tr.distill_loss

    def slowing_loss(*a, **kw):
        clock["calls"] += 1
        clock["now"] += (0.05 if clock["calls"] <= 2 * 3 else 0.15) / 2  # two micro-batches a step
        return loss(*a, **kw)

    monkeypatch.setattr(tr, "distill_loss", slowing_loss)
    monkeypatch.setattr(tr, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: clock["now"])}))
    cfg = _cfg(max_steps=60, time_budget="6s", warmup_steps=3, checkpoint_every=100)
    student = _student(teacher)
    summary = tr.train(student, LiveTeacher(teacher), examples, cfg, tmp_path, pad_id=tok.pad_token_id)
    plan = json.loads((tmp_path / "train_plan.json").read_text())
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert plan["first_max_steps"] == 60 and plan["refits"] >= 1
    assert summary["steps"] == plan["max_steps"] == len(rows) < 60
    assert rows[-1]["elapsed_s"] == pytest.approx(clock["now"])
    assert 6.0 - 2 * 0.15 < clock["now"] <= 6.0 + 0.15  # ends at the budget, give or take a step


def test_a_resumed_run_counts_its_kept_steps_time_against_the_budget(setup, tmp_path, monkeypatch):
    """A fake clock, 0.1 s a step: killed in step 22 of the about 60 a 6 s budget allows, the run
    resumes from its step-20 checkpoint in a new process (its clock starts again) and trains the
    steps left, about 4 s, not another 6."""
    teacher, tok, examples = setup
    clock = {"now": 0.0, "calls": 0, "kill_at": 2 * 21 + 1}  # the first micro-batch of step 22
    loss = tr.distill_loss

    def timed_loss(*a, **kw):
        clock["calls"] += 1
        if clock["calls"] == clock["kill_at"]:
            raise RuntimeError("killed")
        clock["now"] += 0.1 / 2  # two micro-batches a step
        return loss(*a, **kw)

    monkeypatch.setattr(tr, "distill_loss", timed_loss)
    monkeypatch.setattr(tr, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: clock["now"])}))
    cfg = _cfg(max_steps=200, time_budget="6s", warmup_steps=3, checkpoint_every=5)
    with pytest.raises(RuntimeError, match="killed"):
        tr.train(_student(teacher), LiveTeacher(teacher), examples, cfg, tmp_path, pad_id=tok.pad_token_id)
    clock.update(now=0.0, kill_at=-1)
    student = _student(teacher)
    summary = tr.train(student, LiveTeacher(teacher), examples, cfg, tmp_path, pad_id=tok.pad_token_id)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    n = summary["steps"]
    assert [r["step"] for r in rows] == list(range(1, n + 1))
    assert clock["now"] == pytest.approx(0.1 * (n - 20))  # the resumed process trained from step 21
    assert rows[19]["elapsed_s"] == pytest.approx(2.0)
    assert rows[-1]["elapsed_s"] == pytest.approx(2.0 + clock["now"])
    assert 6.0 - 3 * 0.1 <= rows[-1]["elapsed_s"] <= 6.0 + 0.1  # 2 s before the kill and about 4 after


def test_a_resumed_run_counts_the_time_its_kept_steps_took(tmp_path):
    from distill.train.checkpoint import _keep_metrics_upto

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "elapsed_s": 1.5 * s}) + "\n" for s in range(1, 9)))
    assert _keep_metrics_upto(path, 6) == 9.0 and _steps_logged(tmp_path) == list(range(1, 7))
    assert _keep_metrics_upto(tmp_path / "none.jsonl", 6) == 0.0


def test_step_sizes_are_the_positions_each_steps_batches_compute():
    import random

    rng = random.Random(0)
    examples = [([1] * rng.randint(3, 60), [True] * 2) for _ in range(37)]
    for grouped in (False, True):
        cfg = _cfg(batch_size=3, grad_accum=2, group_by_length=grouped)
        sizes = tr.StepSizes(examples, cfg)
        for s in (0, 1, 5, 12, 40):  # 40: past the first epoch and the first span of 32 steps
            padded = sum(b.input_ids.numel() for b in tr.micro_batches(examples, s, cfg, pad_id=0))
            assert sizes(s) == padded


def test_the_plan_weighs_each_step_by_its_size():
    # steps 0..2 timed at 1 s with 100 positions each; every later step has 200, so costs 2 s:
    # 20 s left fit 10 more steps, not the 20 the mean step time alone would allow
    cfg = _cfg(max_steps=1000, time_budget="25s")
    plan = tr.TimePlan.fit(cfg, 3, [1.0, 1.0, 1.0], 5.0, sizes=lambda s: 100 if s < 3 else 200)
    assert plan.max_steps == 13 and plan.planned_seconds == pytest.approx(25.0)
    assert tr.TimePlan.fit(cfg, 3, [1.0, 1.0, 1.0], 5.0).max_steps == 23


def test_the_plan_times_the_rest_of_the_warmup_within_bounds():
    assert tr.plan_measure(_cfg(warmup_steps=10)) == 9  # steps 2..10: no step so far used the plan
    assert tr.plan_measure(_cfg(warmup_steps=0)) == 2
    assert tr.plan_measure(_cfg(warmup_steps=500)) == 10


def test_time_plan_counts_the_students_sampling_as_lambda_rises():
    # constant lambda 0.5, one micro-batch of 4 rows a step: a sampling call (2 s) unless no row is
    # chosen, so each step costs 1 + 2 * (1 - 0.5 ** 4) = 2.875 s; 97 s left after 3 steps
    cfg = _cfg(max_steps=1000, time_budget="100s", onpolicy_fraction=0.5)
    plan = tr.TimePlan.fit(cfg, 3, [3.0, 3.0], 3.0, sampled_in_steps=4.0, per_call=2.0, calls_per_step=1,
                           rows_per_call=4)  # fmt: skip
    assert plan.step_seconds == 1.0 and plan.max_steps == 3 + 33
    # linear 0 -> 0.5: step s of an n-step run costs 1 + 2 * (1 - (1 - 0.5 * s / (n - 1)) ** 4); the
    # plan is the largest n whose steps 3..n-1 fit, found here by walking n up
    lin = _cfg(max_steps=1000, time_budget="100s", onpolicy_fraction=0.5, onpolicy_schedule="linear")
    got = tr.TimePlan.fit(lin, 3, [1.0, 1.0], 3.0, per_call=2.0, calls_per_step=1, rows_per_call=4)

    def cost(n):
        return sum(1 + 2 * (1 - (1 - 0.5 * s / (n - 1)) ** 4) for s in range(3, n))

    walk = max(n for n in range(4, 1000) if cost(n) <= 97)
    assert got.max_steps == walk and 36 < walk < 97
    assert got.planned_seconds == pytest.approx(3 + cost(walk))
    assert "per micro-batch the student samples for" in got.describe("100s")


def test_time_budget_with_on_policy_probes_the_sampling_cost(setup, tmp_path):
    teacher, tok, examples = setup
    cfg = _cfg(max_steps=50, time_budget="2s", onpolicy_fraction=0.5, onpolicy_schedule="linear",
               onpolicy_max_new_tokens=4, grad_accum=1)  # fmt: skip
    tr.train(_student(teacher), LiveTeacher(teacher), examples, cfg, tmp_path, pad_id=tok.pad_token_id)
    plan = json.loads((tmp_path / "train_plan.json").read_text())
    # lambda is 0 in the timed steps, so the cost per sampled row came from the probe
    assert plan["sample_seconds_per_call"] > 0 and plan["calls_per_step"] == 1 and plan["rows_per_call"] == 3


def test_time_budget_sets_the_step_count_and_a_resume_keeps_it(setup, tmp_path):
    teacher, tok, examples = setup
    cfg = _cfg(max_steps=40, time_budget="2h", checkpoint_every=3, warmup_steps=5)
    summary = tr.train(
        _student(teacher), LiveTeacher(teacher), examples, cfg, tmp_path, pad_id=tok.pad_token_id
    )
    plan = json.loads((tmp_path / "train_plan.json").read_text())
    assert plan["max_steps"] == summary["steps"] == 40 and plan["capped"]  # 2 h: max_steps binds
    assert plan["measured_steps"] == 4  # warm-up steps 2..5, timed after one untimed step
    # a resumed run reads the plan instead of measuring again, so its schedule is the one it began with
    (tmp_path / "train_plan.json").write_text(json.dumps({**plan, "max_steps": 7}))
    import shutil

    for p in (tmp_path / "checkpoints").iterdir():
        if p.name != "step-000003":
            shutil.rmtree(p)
    summary = tr.train(
        _student(teacher), LiveTeacher(teacher), examples, cfg, tmp_path, pad_id=tok.pad_token_id
    )
    assert summary["steps"] == 7 and _steps_logged(tmp_path) == list(range(1, 8))


# --- prompt-token distillation ------------------------------------------------------------------


def test_prompt_targets_are_the_prompt_positions_of_each_sample():
    from distill.core.data import Batch

    ids = torch.arange(10).view(1, 10)
    answer = torch.tensor([[0, 0, 1, 1, 0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    plain = Batch(ids, torch.tensor([[1] * 9 + [0]]), answer)
    # position t predicts t + 1: prompt tokens 1, 4, 5, 6 are targets (9 is padding)
    assert plain.prompt_targets()[0].nonzero().squeeze(-1).tolist() == [0, 3, 4, 5]
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])
    packed = Batch(
        ids, torch.ones(1, 10, dtype=torch.long), answer, position_ids=pos, segments=[[(0, 4), (4, 6)]]
    )
    # the same, but position 3 (the first sample's last token) does not predict the next sample
    assert packed.prompt_targets()[0].nonzero().squeeze(-1).tolist() == [0, 4, 5, 8]


@pytest.mark.parametrize("chunked", [False, True])
def test_prompt_weight_adds_a_kd_term_on_prompt_positions(setup, chunked):
    teacher, tok, examples = setup
    batch = tr.collate(examples[:4], tok.pad_token_id)
    n, n_prompt = batch.num_target_tokens, int(batch.prompt_targets().sum())
    assert 0 < n_prompt
    student = _student(teacher)
    cfg = _cfg(alpha=0.5, prompt_weight=0.3, chunked_loss=chunked)
    out = tr.distill_loss(student, LiveTeacher(teacher), batch, cfg, n, None, n_prompt)
    # reference in float64 from plain logits: answer part as before, plus 0.3 * mean KL on prompt rows
    with torch.no_grad():
        s = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].double()
        t = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].double()
    kl = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1)  # (B, T-1)
    ce = -s.log_softmax(-1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    ans, pr = batch.answer_mask[:, 1:], batch.prompt_targets()
    ref = 0.5 * kl[ans].sum() / n + 0.5 * ce[ans].sum() / n + 0.3 * kl[pr].sum() / n_prompt
    assert float(out.loss.detach()) == pytest.approx(float(ref), rel=1e-4)
    assert out.prompt == pytest.approx(float(kl[pr].sum() / n_prompt), rel=1e-4)


def test_prompt_weight_trains_and_logs_its_part(setup, tmp_path):
    teacher, tok, examples = setup
    cfg = _cfg(prompt_weight=0.5, max_steps=3)
    tr.train(_student(teacher), LiveTeacher(teacher), examples, cfg, tmp_path, pad_id=tok.pad_token_id)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["prompt_kd"] > 0 for r in rows)
    with pytest.raises(ValueError, match="train.prompt_weight needs a live local teacher"):
        from distill.core.recipe import load_config

        load_config(None, ["train.prompt_weight=0.5", "train.hidden_weight=0", "cache.use=true"])


@pytest.mark.parametrize("kept", [[0, 2], [1, 3]])
@pytest.mark.parametrize("chunked", [False, True])
def test_hidden_alignment_pairs_layer_outputs_before_the_final_norm(setup, kept, chunked):
    """transformers gives the last hidden state after the final norm, every other one before it.
    Each student layer is compared with its teacher layer as both hand their outputs on (before the
    final norm), whether the teacher's last layer is kept ([1, 3]) or not ([0, 2])."""
    teacher, tok, examples = setup
    with torch.no_grad():  # a final norm that is not the identity, so that it shows in the loss
        teacher.model.norm.weight.uniform_(0.5, 2.0)
    student = shrink_layers(teacher, kept)
    batch = tr.collate(examples[:4], tok.pad_token_id)
    n = batch.num_target_tokens
    cfg = _cfg(alpha=0.5, hidden_weight=1.0, hidden_loss="mse", chunked_loss=chunked)
    got = tr.distill_loss(student, LiveTeacher(teacher, align_layers=kept), batch, cfg, n)

    def layer_outputs(model):  # every layer's output: a copy whose final norm does nothing
        bare = copy.deepcopy(model)
        bare.model.norm = torch.nn.Identity()
        with torch.no_grad():
            out = bare(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True
            )
        return [h[:, :-1].double() for h in out.hidden_states[1:]]

    s, t = layer_outputs(student), layer_outputs(teacher)
    mask = batch.answer_mask[:, 1:]
    ref = sum(((s[j] - t[i]) ** 2).mean(-1)[mask].sum() for j, i in enumerate(kept)) / n / len(kept)
    assert got.hidden == pytest.approx(float(ref), rel=1e-5)


def test_a_checkpoint_keeps_the_gpus_random_states_and_a_resume_sets_them_back(setup, tmp_path, monkeypatch):
    """With CUDA, ``rng-0.pt`` holds every GPU's random state beside the CPU's, as tensors that load
    without a GPU; resuming sets them back (``torch.cuda`` faked: the tests run on CPUs)."""
    teacher, _, _ = setup
    gen = torch.Generator().manual_seed(0)
    gpu_states = [torch.randint(0, 256, (16,), dtype=torch.uint8, generator=gen) for _ in range(2)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in gpu_states])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    student = _student(teacher)
    opt = torch.optim.AdamW(student.parameters())
    cpu_state = torch.get_rng_state()
    path = tr.save_checkpoint(tmp_path, 3, student.state_dict(), opt.state_dict(), keep=1)
    saved = torch.load(path / "rng-0.pt", weights_only=True)
    assert torch.equal(saved["torch"], cpu_state)
    assert [s.tolist() for s in saved["cuda"]] == [s.tolist() for s in gpu_states]

    torch.rand(100)  # the CPU's generator moves on
    assert tr.load_checkpoint(path, _student(teacher), torch.optim.AdamW(student.parameters())) == 3
    assert torch.equal(torch.get_rng_state(), cpu_state)
    assert [[s.tolist() for s in call] for call in restored] == [[s.tolist() for s in gpu_states]]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same checkpoint on a CPU machine
    assert tr.load_checkpoint(path, _student(teacher), torch.optim.AdamW(student.parameters())) == 3
    assert len(restored) == 1


def test_each_process_resumes_from_its_own_random_state(setup, tmp_path):
    """Two processes draw their own dropout and samples: the checkpoint keeps each one's state
    (``rng-{rank}.pt``) and a resume gives each rank its own. A checkpoint of one process, or the
    older single ``rng.pt``, keeps loading."""
    teacher, _, _ = setup
    student = _student(teacher)
    opt = torch.optim.AdamW(student.parameters())
    per_rank = []
    for seed in (11, 22):  # (rank 0, rank 1)
        torch.manual_seed(seed)
        per_rank.append(checkpoint._rng_states())
    assert not torch.equal(per_rank[0]["torch"], per_rank[1]["torch"])
    path = tr.save_checkpoint(
        tmp_path, 4, student.state_dict(), opt.state_dict(), keep=1, rng_states=per_rank
    )
    assert sorted(p.name for p in path.glob("rng*")) == ["rng-0.pt", "rng-1.pt"]
    for rank in (1, 0):
        torch.rand(100)  # the generator moves on
        assert tr.load_checkpoint(path, _student(teacher), torch.optim.AdamW(student.parameters()), rank) == 4
        assert torch.equal(torch.get_rng_state(), per_rank[rank]["torch"])

    (path / "rng-1.pt").unlink()  # one process's checkpoint, resumed by two: rank 0's state for both
    (path / "rng-0.pt").rename(path / "rng.pt")  # ...under its older name
    torch.rand(100)
    assert tr.load_checkpoint(path, _student(teacher), torch.optim.AdamW(student.parameters()), 1) == 4
    assert torch.equal(torch.get_rng_state(), per_rank[0]["torch"])
