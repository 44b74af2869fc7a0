from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.core.models import ModelNotFoundError, count_params, resolve_gguf
from distill.student.prune import evenly_spaced_layers, shrink_layers


def test_evenly_spaced_layers():
    assert evenly_spaced_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert evenly_spaced_layers(4, 2) == [0, 3]
    assert evenly_spaced_layers(5, 5) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        evenly_spaced_layers(4, 5)


def test_shrink_copies_chosen_layers(tiny_teacher_dir):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    student = shrink_layers(teacher, [1, 3])
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    t, s = teacher.state_dict(), student.state_dict()
    for dst, src in enumerate([1, 3]):
        for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            torch.testing.assert_close(s[f"model.layers.{dst}.{name}"], t[f"model.layers.{src}.{name}"])
        assert student.model.layers[dst].self_attn.layer_idx == dst
    torch.testing.assert_close(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])
    torch.testing.assert_close(s["model.norm.weight"], t["model.norm.weight"])
    assert count_params(student) < count_params(teacher)
    # Copies, not views: training the student must not move the teacher.
    assert s["model.norm.weight"].data_ptr() != t["model.norm.weight"].data_ptr()


def test_shrink_keeping_all_layers_reproduces_teacher(tiny_teacher_dir):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    student = shrink_layers(teacher, [0, 1, 2, 3])
    ids = torch.tensor([[5, 9, 17, 33, 2]])
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits)


def test_shrink_rejects_bad_layers(tiny_teacher_dir):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    for bad in ([], [3, 1], [0, 4], [1, 1]):
        with pytest.raises(ValueError, match="increasing indices"):
            shrink_layers(teacher, bad)


def test_unknown_model_reference_is_explained(tmp_path):
    with pytest.raises(ModelNotFoundError, match="bundled name"):
        resolve_gguf("no-such-model")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_gguf(str(tmp_path / "x.gguf"))
    assert resolve_gguf(str(tmp_path)) is None


def test_layer_outputs_are_read_at_a_final_norm_named_ln_f():
    """GPT-2 keeps its final norm at ``transformer.ln_f``: the last layer's output is read at its
    input, and the norm of it is transformers' last hidden state."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from distill.core.models import forward_with_layer_outputs

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=300, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    out, layers = forward_with_layer_outputs(model, input_ids=torch.randint(0, 300, (2, 7)))
    assert len(layers) == 2 and layers[-1].shape == (2, 7, 16)
    torch.testing.assert_close(layers[0], out.hidden_states[1])
    torch.testing.assert_close(model.transformer.ln_f(layers[-1]), out.hidden_states[-1])


def test_hidden_alignment_without_a_known_final_norm_is_refused_before_any_work(
    tmp_path, tiny_teacher_dir, prompts_file
):
    """OPT's final norm is ``decoder.final_layer_norm``: hidden-state alignment, which reads layer
    outputs at the final norm, is refused at the run's start, naming the key to clear."""
    import yaml
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    from distill import pipeline
    from distill.core.config import ConfigError
    from distill.core.recipe import load_config

    from conftest import tiny_recipe

    opt = OPTConfig(vocab_size=300, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
                    word_embed_proj_dim=16, max_position_embeddings=128)  # fmt: skip
    OPTForCausalLM(opt).save_pretrained(tmp_path / "opt")
    AutoTokenizer.from_pretrained(tiny_teacher_dir).save_pretrained(tmp_path / "opt")
    recipe = tiny_recipe(
        tmp_path / "runs", tiny_teacher_dir, prompts_file,
        student={"init": "model", "model": str(tmp_path / "opt")},
        train={"hidden_weight": 1.0}, export={"formats": ["hf"]},
    )  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match=r"OPTForCausalLM.*set train.hidden_weight=0"):
        pipeline.prepare(load_config(tmp_path / "r.yaml"))
    assert not (tmp_path / "runs").exists()
    pipeline.prepare(load_config(tmp_path / "r.yaml", ["train.hidden_weight=0"]))  # the way out works
