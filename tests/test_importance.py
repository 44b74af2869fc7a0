"""Student construction by measured block importance."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from distill import pipeline
from distill.core.recipe import load_config
from distill.student.importance import block_importance, most_important_layers

from conftest import random_examples, tiny_recipe, tiny_run


def test_block_importance_matches_a_hidden_state_reference(tiny_teacher_dir):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    examples = random_examples(300, 7, 3, lambda i: 2 + i % 3, lambda i: 3 + (i * 5) % 7)
    got = block_importance(teacher, examples, pad_id=0, batch_size=3)  # padded batches
    # reference: one unpadded sequence at a time, from the model's own hidden states, with the
    # final norm taken out so the last layer's output is the residual stream too
    teacher.model.norm = torch.nn.Identity()
    sums, count = torch.zeros(4, dtype=torch.float64), 0
    with torch.no_grad():
        for ids, _ in examples:
            hs = teacher(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
            for i in range(4):
                sums[i] += float((1 - torch.cosine_similarity(hs[i][0], hs[i + 1][0], dim=-1)).sum())
            count += len(ids)
    assert got == pytest.approx((sums / count).tolist(), rel=1e-4)
    assert all(0 < g < 2 for g in got)


def test_most_important_layers_keeps_the_top_in_model_order():
    assert most_important_layers([0.1, 0.9, 0.2, 0.9, 0.5], 3) == [1, 3, 4]
    assert most_important_layers([0.3, 0.3, 0.3], 2) == [0, 1]  # ties: the earlier layer
    with pytest.raises(ValueError, match="cannot keep 4 of 3"):
        most_important_layers([0.1, 0.2, 0.3], 4)


def test_shrink_scores_both_candidates_and_keeps_the_chosen(tmp_path, tiny_teacher_dir, prompts_file):
    recipe = tiny_recipe(tmp_path / "runs", tiny_teacher_dir, prompts_file,
                         student={"layer_selection": "importance", "num_layers": 2})  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    cfg = load_config(tmp_path / "r.yaml")
    pipeline.generate(cfg)
    pipeline.shrink(cfg)
    report = json.loads((cfg.run_dir / "student_candidates.json").read_text())
    names = [c["name"] for c in report["candidates"]]
    assert names == ["even", "importance"] and report["chosen"] == "importance"
    chosen = report["candidates"][1]["layers"]
    assert chosen == most_important_layers(report["importance"], 2)
    assert all(c["untrained_kl"] > 0 and 0 <= c["untrained_top1"] <= 1 for c in report["candidates"])
    student = AutoModelForCausalLM.from_pretrained(cfg.run_dir / "student_init")
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    for j, i in enumerate(chosen):  # the student's layer j is the teacher's layer i, weights and all
        torch.testing.assert_close(
            student.model.layers[j].mlp.up_proj.weight, teacher.model.layers[i].mlp.up_proj.weight
        )


def test_importance_needs_the_teachers_answers(tmp_path, tiny_teacher_dir, prompts_file):
    recipe = tiny_recipe(
        tmp_path / "runs", tiny_teacher_dir, prompts_file, student={"layer_selection": "importance"}
    )
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(pipeline.StageError, match="run `distill generate` first"):
        pipeline.shrink(load_config(tmp_path / "r.yaml"))


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_hidden_alignment_matches_a_float64_reference(kind):
    from distill.losses.divergences import hidden_alignment

    g = torch.Generator().manual_seed(7)
    s = [torch.randn(2, 5, 8, generator=g, requires_grad=True) for _ in range(3)]
    t = [torch.randn(2, 5, 8, generator=g) for _ in range(3)]
    mask = torch.rand(2, 5, generator=g) > 0.4
    got = hidden_alignment(s, t, mask, kind=kind, num_tokens=9)
    grads = torch.autograd.grad(got, s)
    s64 = [x.detach().double().requires_grad_(True) for x in s]
    ref = 0.0
    for a, b in zip(s64, t, strict=True):
        b = b.double()
        for i, j in mask.nonzero().tolist():
            u, v = a[i, j], b[i, j]
            ref = ref + (1 - (u @ v) / (u.norm() * v.norm()) if kind == "cosine" else ((u - v) ** 2).mean())
    ref = ref / 9 / 3
    ref.backward()
    assert float(got) == pytest.approx(float(ref), rel=1e-5)
    for a, b in zip(grads, s64, strict=True):
        torch.testing.assert_close(a.double(), b.grad, rtol=1e-4, atol=1e-7)


def test_training_with_hidden_alignment_pairs_the_kept_layers(tmp_path, tiny_teacher_dir, prompts_file):
    recipe = tiny_recipe(tmp_path / "runs", tiny_teacher_dir, prompts_file,
                         train={"hidden_weight": 0.5, "max_steps": 4})  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    cfg = load_config(tmp_path / "r.yaml")
    pipeline.generate(cfg)
    pipeline.shrink(cfg)
    pipeline.train_student(cfg)
    layers = json.loads((cfg.run_dir / "student_init" / "layer_map.json").read_text())["teacher_layers"]
    assert layers == [0, 3]
    rows = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["hidden"] > 0 for r in rows)
    summary = json.loads((cfg.run_dir / "train_summary.json").read_text())
    assert "hidden states of layers [0, 3]" in summary["teacher_signal"]
    with pytest.raises(ValueError, match="needs a live local teacher"):
        load_config(tmp_path / "r.yaml", ["cache.use=true", "train.hidden_weight=0.5"])


def test_hidden_alignment_through_a_projection_matches_a_reference():
    from distill.losses.divergences import hidden_alignment

    g = torch.Generator().manual_seed(8)
    s = [torch.randn(2, 5, 6, generator=g, requires_grad=True) for _ in range(2)]  # student width 6
    t = [torch.randn(2, 5, 8, generator=g) for _ in range(2)]  # teacher width 8
    proj = torch.nn.Linear(6, 8, bias=False)
    mask = torch.rand(2, 5, generator=g) > 0.3
    got = hidden_alignment(s, t, mask, kind="cosine", num_tokens=7, projection=proj)
    got.backward()
    ref = (
        sum(
            (1 - torch.cosine_similarity(a @ proj.weight.T, b, dim=-1))[mask].sum()
            for a, b in zip(s, t, strict=True)
        )
        / 7
        / 2
    )
    assert float(got) == pytest.approx(float(ref), rel=1e-5)
    with pytest.raises(ValueError, match="differ"):
        hidden_alignment(s, t, mask)  # widths differ and no projection


def test_a_narrower_given_student_aligns_through_a_learned_projection(
    tmp_path, tiny_teacher_dir, prompts_file
):
    from safetensors import safe_open
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                         pad_token_id=tok.pad_token_id)  # fmt: skip
    narrow = LlamaForCausalLM(config)
    narrow.save_pretrained(tmp_path / "narrow")
    tok.save_pretrained(tmp_path / "narrow")
    student = {"init": "model", "model": str(tmp_path / "narrow")}
    cfg = tiny_run(tmp_path, tiny_teacher_dir, prompts_file, student=student,
                   train={"hidden_weight": 0.5, "max_steps": 4, "checkpoint_every": 2})  # fmt: skip
    run = cfg.run_dir
    summary = json.loads((run / "train_summary.json").read_text())
    # 2 student layers of a 4-layer teacher: layers 1 and 3, through a 16 -> 32 projection
    assert "hidden states of layers [1, 3] through a learned 16 -> 32 projection" in summary["teacher_signal"]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["hidden"] > 0 for r in rows)
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    keys = set()
    for f in ckpts[-1].rglob("*.safetensors"):
        with safe_open(f, "pt") as sf:
            keys |= set(sf.keys())
    assert any("distill_hidden_projection" in k for k in keys)  # trained and checkpointed with the student
    with safe_open(run / "student" / "model.safetensors", "pt") as sf:
        assert not any("distill_hidden_projection" in k for k in sf.keys())  # not in the exported model
    AutoModelForCausalLM.from_pretrained(run / "student")  # a stock model
