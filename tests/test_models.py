from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.models import (
    ModelNotFoundError,
    count_params,
    evenly_spaced_layers,
    resolve_gguf,
    shrink_layers,
)


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
