"""Evaluation metrics: teacher-forced fidelity across heads that differ only by padding."""

from __future__ import annotations

import copy

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.evaluate import forced_metrics

from conftest import random_examples


def test_padded_lm_head_pair_is_compared_on_the_real_vocabulary(tiny_teacher_dir):
    """Defect 6: a student whose head is padded (e.g. 152,064 vs 151,936 columns) crashed evaluation
    after training succeeded. Padding the teacher's own head must leave KL 0 and agreement 1."""
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    student = copy.deepcopy(teacher)
    student.resize_token_embeddings(len(tok) + 13, mean_resizing=False)
    assert student.lm_head.weight.shape[0] == len(tok) + 13
    examples = random_examples(len(tok), 6, 2, lambda i: 3, lambda i: 4 + i)
    got = forced_metrics(student, teacher, examples, tok.pad_token_id, 4, vocab_size=len(tok))
    same = forced_metrics(teacher, teacher, examples, tok.pad_token_id, 4, vocab_size=len(tok))
    assert got["kl"] == pytest.approx(0.0, abs=1e-5) and got["top1_agreement"] == 1.0
    assert got["perplexity"] == pytest.approx(same["perplexity"], rel=1e-5)
    with pytest.raises(ValueError, match="vocab_size=len\\(tokenizer\\)"):  # without it: the clear error
        forced_metrics(student, teacher, examples, tok.pad_token_id, 4)


def test_teacher_logprob_of_answers_matches_a_hand_sum(tiny_teacher_dir):
    import torch

    from distill.evaluate import teacher_logprob

    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    examples = random_examples(300, 5, 4, lambda i: 2 + i, lambda i: 3 + i % 2)
    got = teacher_logprob(teacher, examples, 0, batch_size=2)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in examples:
            logp = torch.log_softmax(teacher(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            for t in range(1, len(ids)):
                if mask[t]:
                    total += float(logp[t - 1, ids[t]])
                    count += 1
    assert got == pytest.approx(total / count, rel=1e-5) and got < 0
