"""Width pruning (Minitron): heads and MLP channels ranked by activation, cut, and searched."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from distill import pipeline
from distill.core.answers import read_answers
from distill.core.config import ConfigError
from distill.core.models import load_tokenizer
from distill.core.recipe import load_config
from distill.student.importance import top_channels, top_heads, width_importance
from distill.student.prune import prune_width
from distill.teacher.examples import training_examples

from conftest import random_examples, tiny_recipe


def _masked(model, heads: list[list[int]] | None, channels: list[list[int]] | None):
    """Hooks that zero the dropped heads' attention outputs and the dropped MLP activations."""
    head_dim = model.config.head_dim
    handles = []
    for i, layer in enumerate(model.model.layers):
        if heads is not None:
            m = torch.zeros(model.config.num_attention_heads)
            m[heads[i]] = 1
            m = m.repeat_interleave(head_dim)
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda _, a, m=m: (a[0] * m,)))
        if channels is not None:
            c = torch.zeros(model.config.intermediate_size)
            c[channels[i]] = 1
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(lambda _, a, c=c: (a[0] * c,)))
    return handles


@pytest.mark.parametrize("what", ["heads", "channels", "both"])
def test_pruned_model_equals_the_masked_original(tiny_teacher_dir, what):
    teacher = AutoModelForCausalLM.from_pretrained(
        tiny_teacher_dir
    ).eval()  # 4 heads, 2 kv groups, 64 channels
    g = torch.Generator().manual_seed(3)
    heads = [[0, 3], [1, 2], [0, 2], [1, 3]] if what != "channels" else None  # one head of each group
    channels = (
        [sorted(torch.randperm(64, generator=g)[:23].tolist()) for _ in range(4)] if what != "heads" else None
    )
    pruned = prune_width(teacher, heads, channels)
    assert pruned.config.num_attention_heads == (2 if heads else 4)
    assert pruned.config.intermediate_size == (23 if channels else 64)
    assert pruned.config.head_dim == 8  # written out: 32 hidden / 2 heads would be wrong
    for i, layer in enumerate(pruned.model.layers):  # the named heads and channels, weights and all
        src = teacher.model.layers[i]
        if heads:
            rows = torch.cat([torch.arange(h * 8, h * 8 + 8) for h in heads[i]])
            torch.testing.assert_close(layer.self_attn.q_proj.weight, src.self_attn.q_proj.weight[rows])
            torch.testing.assert_close(layer.self_attn.o_proj.weight, src.self_attn.o_proj.weight[:, rows])
        if channels:
            torch.testing.assert_close(layer.mlp.up_proj.weight, src.mlp.up_proj.weight[channels[i]])
            torch.testing.assert_close(layer.mlp.down_proj.weight, src.mlp.down_proj.weight[:, channels[i]])
    ids = torch.randint(3, 300, (3, 11), generator=g)
    unmasked = teacher(ids).logits
    handles = _masked(teacher, heads, channels)
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, teacher(ids).logits, atol=1e-5, rtol=1e-5)
    assert (unmasked - pruned(ids).logits).abs().max() > 1e-2  # the cut changed something
    for h in handles:
        h.remove()


def test_pruned_model_saves_and_loads_in_stock_transformers(tiny_teacher_dir, tmp_path):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    pruned = prune_width(teacher, [[1, 2]] * 4, [list(range(0, 64, 2))] * 4)
    pruned.save_pretrained(tmp_path / "p", safe_serialization=True)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()
    ids = torch.tensor([[5, 9, 17, 4]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, pruned(ids).logits)


def test_prune_width_refuses_an_uneven_head_choice(tiny_teacher_dir):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    with pytest.raises(ValueError, match="as many query heads from each of the 2 key/value groups"):
        prune_width(teacher, [[0, 1]] * 4)  # both from group 0
    with pytest.raises(ValueError, match="one list per layer"):
        prune_width(teacher, None, [[0, 1]] * 3)


def test_width_importance_matches_a_per_sequence_reference(tiny_teacher_dir):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    examples = random_examples(300, 6, 5, lambda i: 2 + i % 3, lambda i: 3 + i % 4)
    got = width_importance(teacher, examples, pad_id=0, batch_size=4)  # padded batches
    # reference: one unpadded sequence at a time, the activations rebuilt from the weights
    heads = torch.zeros(4, 4, dtype=torch.float64)
    chans = torch.zeros(4, 64, dtype=torch.float64)
    seen: dict[int, torch.Tensor] = {}
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(lambda _, a, i=i: seen.__setitem__(i, a[0]))
             for i, layer in enumerate(teacher.model.layers)]  # fmt: skip
    count = 0
    with torch.no_grad():
        for ids, _ in examples:
            hs = teacher(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
            for i, layer in enumerate(teacher.model.layers):
                heads[i] += seen[i][0].view(len(ids), 4, 8).norm(dim=-1).sum(0).double()
                # the MLP's input is the post-attention residual, normed
                h = hs[i][0] + layer.self_attn.o_proj(seen[i][0])
                x = layer.post_attention_layernorm(h)
                act = torch.nn.functional.silu(layer.mlp.gate_proj(x)) * layer.mlp.up_proj(x)
                chans[i] += act.abs().sum(0).double()
            count += len(ids)
    for h in hooks:
        h.remove()
    for i in range(4):
        torch.testing.assert_close(got.heads[i], heads[i] / count, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(got.channels[i], chans[i] / count, rtol=1e-4, atol=1e-7)


def test_top_heads_keeps_as_many_from_each_group():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.8, 0.2, 0.3])  # 2 groups of 3
    assert top_heads(scores, 2, 4) == [1, 2, 3, 5]
    assert top_heads(scores, 2, 2) == [1, 3]
    with pytest.raises(ValueError, match="multiple of the 2 key/value heads"):
        top_heads(scores, 2, 3)
    assert top_channels(torch.tensor([0.3, 0.1, 0.7, 0.2]), 2) == [0, 2]


def test_shrink_with_widths_keeps_the_most_active_heads_and_channels(
    tmp_path, tiny_teacher_dir, prompts_file
):
    recipe = tiny_recipe(tmp_path / "runs", tiny_teacher_dir, prompts_file,
                         student={"layer_selection": "importance", "num_layers": 2, "num_heads": 2,
                                  "intermediate_size": 40})  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    cfg = load_config(tmp_path / "r.yaml")
    pipeline.generate(cfg)
    pipeline.shrink(cfg)
    student = AutoModelForCausalLM.from_pretrained(cfg.run_dir / "student_init")
    assert (student.config.num_hidden_layers, student.config.num_attention_heads) == (2, 2)
    assert student.config.intermediate_size == 40
    report = json.loads((cfg.run_dir / "student_candidates.json").read_text())
    chosen = next(c for c in report["candidates"] if c["name"] == "importance")
    assert all(
        c["speedup"] > 0 and c["params"] == report["candidates"][0]["params"] for c in report["candidates"]
    )
    # rebuild the expected cut from an independent importance pass over the same calibration answers
    tok = load_tokenizer(str(tiny_teacher_dir))
    train_p, _ = pipeline.load_split(cfg)
    calib = training_examples(cfg, tok, train_p, read_answers(cfg.run_dir / "answers.jsonl"))
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    width = width_importance(teacher, calib[: cfg.student.calibration_samples], tok.pad_token_id)
    for j, i in enumerate(chosen["layers"]):
        keep = top_channels(width.channels[i], 40)
        torch.testing.assert_close(
            student.model.layers[j].mlp.up_proj.weight, teacher.model.layers[i].mlp.up_proj.weight[keep]
        )
        kh = top_heads(width.heads[i], 2, 2)
        rows = torch.cat([torch.arange(h * 8, h * 8 + 8) for h in kh])
        torch.testing.assert_close(
            student.model.layers[j].self_attn.q_proj.weight,
            teacher.model.layers[i].self_attn.q_proj.weight[rows],
        )


def test_target_params_searches_shapes_and_picks_the_lowest_kl(tmp_path, tiny_teacher_dir, prompts_file):
    recipe = tiny_recipe(tmp_path / "runs", tiny_teacher_dir, prompts_file,
                         student={"layer_selection": "importance", "target_params": "30k"})  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    cfg = load_config(tmp_path / "r.yaml")
    pipeline.generate(cfg)
    pipeline.shrink(cfg)
    report = json.loads((cfg.run_dir / "student_candidates.json").read_text())
    cands = report["candidates"]
    assert len(cands) >= 2 and all(c["params"] <= 30_000 for c in cands)
    best = min(cands, key=lambda c: c["untrained_kl"])
    assert report["chosen"] == best["name"]
    student = AutoModelForCausalLM.from_pretrained(cfg.run_dir / "student_init")
    assert student.num_parameters() == best["params"]
    assert student.config.num_hidden_layers == len(best["layers"])


def test_width_and_target_checked_before_any_work(tmp_path, tiny_teacher_dir, prompts_file):
    for student, msg in (({"num_heads": 3}, "multiple of 2 up to 4"),
                         ({"intermediate_size": 65}, "has 64 MLP channels"),
                         ({"target_params": "5k"}, "aim higher")):  # fmt: skip
        recipe = tiny_recipe(tmp_path / "runs", tiny_teacher_dir, prompts_file, student=student)
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
        with pytest.raises(ConfigError, match=msg):
            pipeline.prepare(load_config(tmp_path / "r.yaml"))
        assert not (tmp_path / "runs" / "tiny").exists()
    with pytest.raises(Exception, match="search the shape"):
        load_config(None, ["student.target_params=70M", "student.num_heads=3"])


def _fake_speed(monkeypatch, a=0.1, b=0.2):
    """Seconds per token (in teacher units) of a + b * layers: a deterministic stand-in for timing."""
    import distill.student.build as st

    monkeypatch.setattr(st, "_speedup", lambda model, *args: 1 / (a + b * model.config.num_hidden_layers))


def test_depth_for_speedup_fits_the_time_per_layer(tiny_teacher_dir, monkeypatch):
    from distill.student.build import depth_for_speedup

    _fake_speed(monkeypatch)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    # 1 / target = 0.1 + 0.2 * depth, rounded down: 2x -> 2 layers, 1.2x -> 3, 10x -> none
    for target, depth in ((2.0, 2), (1.2, 3), (10.0, 0)):
        assert (
            depth_for_speedup(teacher, teacher, 4, 64, target, None, [[5, 6]], torch.float32, None) == depth
        )


def test_target_speedup_keeps_only_candidates_measured_fast_enough(tmp_path, tiny_teacher_dir, prompts_file,
                                                                   monkeypatch):  # fmt: skip
    _fake_speed(monkeypatch)
    recipe = tiny_recipe(tmp_path / "runs", tiny_teacher_dir, prompts_file,
                         student={"layer_selection": "importance", "target_speedup": 2.0})  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    cfg = load_config(tmp_path / "r.yaml")
    pipeline.generate(cfg)
    pipeline.shrink(cfg)
    report = json.loads((cfg.run_dir / "student_candidates.json").read_text())
    assert report["target_speedup"] == 2.0
    cands = report["candidates"]
    assert cands and all(len(c["layers"]) == 2 and c["speedup"] == pytest.approx(2.0) for c in cands)
    assert report["chosen"] == min(cands, key=lambda c: c["untrained_kl"])["name"]


def test_hidden_pruning_equals_the_original_with_the_channels_zeroed_and_norms_rescaled(tiny_teacher_dir):
    """Keep 20 of 32 residual channels (with heads and MLP channels cut too). Reference: the
    original with the dropped channels zero in every tensor that writes the stream (so the stream
    carries zeros there) and each norm weight times sqrt(20/32), since RMSNorm then averages over
    32 channels where the pruned model averages over 20."""
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    teacher.config.rms_norm_eps = 1e-12  # eps would break the exact rescaling
    for m in teacher.modules():
        if hasattr(m, "variance_epsilon"):
            m.variance_epsilon = 1e-12
    g = torch.Generator().manual_seed(4)
    keep = sorted(torch.randperm(32, generator=g)[:20].tolist())
    drop = [c for c in range(32) if c not in keep]
    heads, channels = [[0, 3], [1, 2], [0, 2], [1, 3]], [list(range(0, 64, 2))] * 4
    with torch.no_grad():  # the stream's dropped channels start and stay zero
        teacher.model.embed_tokens.weight[:, drop] = 0
        for layer in teacher.model.layers:
            layer.self_attn.o_proj.weight[drop] = 0
            layer.mlp.down_proj.weight[drop] = 0
    pruned = prune_width(teacher, heads, channels, keep)
    assert pruned.config.hidden_size == 20 and pruned.config.head_dim == 8
    torch.testing.assert_close(pruned.model.embed_tokens.weight, teacher.model.embed_tokens.weight[:, keep])
    torch.testing.assert_close(
        pruned.model.layers[1].self_attn.k_proj.weight,
        teacher.model.layers[1].self_attn.k_proj.weight[:, keep],
    )
    reference = copy.deepcopy(teacher)
    with torch.no_grad():
        for m in reference.modules():
            if type(m).__name__.endswith("RMSNorm"):
                m.weight *= (20 / 32) ** 0.5
    ids = torch.randint(3, 300, (3, 11), generator=g)
    handles = _masked(reference, heads, channels)
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)
        assert (pruned(ids).logits - teacher(ids).logits).abs().max() > 1e-2  # the rescale mattered
    for h in handles:
        h.remove()


def test_hidden_importance_and_shrink_keep_the_most_active_channels(tmp_path, tiny_teacher_dir, prompts_file):
    student = {"layer_selection": "importance", "num_layers": 2, "hidden_size": 24}
    recipe = tiny_recipe(tmp_path / "runs", tiny_teacher_dir, prompts_file, student=student,
                         train={"hidden_weight": 1.0, "max_steps": 2})  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    cfg = load_config(tmp_path / "r.yaml")
    pipeline.generate(cfg)
    pipeline.shrink(cfg)
    student = AutoModelForCausalLM.from_pretrained(cfg.run_dir / "student_init")
    assert student.config.hidden_size == 24 and student.config.num_attention_heads == 4
    # the reference importance: |RMSNorm output| per channel, one unpadded sequence at a time
    tok = load_tokenizer(str(tiny_teacher_dir))
    train_p, _ = pipeline.load_split(cfg)
    calib = training_examples(cfg, tok, train_p, read_answers(cfg.run_dir / "answers.jsonl"))
    calib = calib[: cfg.student.calibration_samples]
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    ref = torch.zeros(32, dtype=torch.float64)
    norms = [m for m in teacher.modules() if type(m).__name__.endswith("RMSNorm")]
    assert len(norms) == 2 * 4 + 1
    outs: list[torch.Tensor] = []
    hooks = [n.register_forward_hook(lambda _, a, o: outs.append(o)) for n in norms]
    count = 0
    with torch.no_grad():
        for ids, _ in calib:
            outs.clear()
            teacher(input_ids=torch.tensor([ids]))
            ref += sum(o[0].abs().sum(0).double() for o in outs)
            count += len(ids)
    for h in hooks:
        h.remove()
    got = width_importance(teacher, calib, tok.pad_token_id).hidden
    torch.testing.assert_close(got, ref / count, rtol=1e-4, atol=1e-7)
    kept = top_channels(got, 24)
    torch.testing.assert_close(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight[:, kept])
    # it trains, hidden states aligned through a 24 -> 32 projection, and loads in stock transformers
    pipeline.train_student(cfg)
    trained = AutoModelForCausalLM.from_pretrained(cfg.run_dir / "student")
    assert trained.config.hidden_size == 24
    assert not torch.equal(trained.model.embed_tokens.weight, student.model.embed_tokens.weight)
    # refused before any work where it cannot hold
    with pytest.raises(ConfigError, match="hidden_size=64"):
        pipeline.prepare(load_config(tmp_path / "r.yaml", ["student.hidden_size=64"]))
    with pytest.raises(ConfigError, match="multiple of the 4 attention heads; choose 20 or 24"):
        pipeline.prepare(load_config(tmp_path / "r.yaml", ["student.hidden_size=22"]))
