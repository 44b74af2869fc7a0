"""Evaluation metrics: teacher-forced fidelity across heads that differ only by padding."""

from __future__ import annotations

import copy

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.evaluate.metrics import forced_metrics

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

    from distill.evaluate.metrics import teacher_logprob

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


def test_rouge_l_and_reference_matching_against_hand_values():
    from distill.evaluate.metrics import matches_reference, rouge_l

    # LCS "the cat on the mat" = 5 of 6 words each way: P = R = F1 = 5/6
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # LCS "b d" = 2: P = 2/4, R = 2/3, F1 = 2PR / (P + R) = 4/7
    assert rouge_l("a b c d", "b d e") == pytest.approx(4 / 7)
    assert rouge_l("x y", "z") == 0.0 and rouge_l("", "") == 1.0 and rouge_l("", "a") == 0.0
    assert matches_reference("so the total is 1,234.", "1234")  # the last number, as a number
    assert matches_reference("half: 0.50", "1/2") and not matches_reference("3 then 4", "3")
    assert matches_reference("The capital is PARIS.", "Paris") and not matches_reference("Lyon", "Paris")


def test_per_example_sums_are_each_prompts_share_of_the_totals(tiny_teacher_dir):
    """What the intervals resample: each example's KL sum, agreements, CE sum and token count, which
    add up to the totals and match a float64 computation of that example alone."""
    import torch

    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    examples = random_examples(len(tok), 5, 3, lambda i: 2 + i, lambda i: 3 + i)
    got = forced_metrics(student, teacher, examples, tok.pad_token_id, 2, vocab_size=len(tok))
    rows = got["per_example"]
    assert [r["tokens"] for r in rows] == [sum(m[1:]) for _, m in examples]
    total = sum(r["tokens"] for r in rows)
    assert got["kl"] == pytest.approx(sum(r["kl"] for r in rows) / total)
    assert got["top1_agreement"] == pytest.approx(sum(r["agree"] for r in rows) / total)
    ids, mask = examples[3]
    with torch.no_grad():
        x = torch.tensor([ids])
        ls = torch.log_softmax(student(input_ids=x).logits[0].double(), -1)
        lt = torch.log_softmax(teacher(input_ids=x).logits[0].double(), -1)
    kl = agree = ce = 0.0
    for t in range(1, len(ids)):
        if mask[t]:
            kl += float((lt[t - 1].exp() * (lt[t - 1] - ls[t - 1])).sum())
            agree += int(ls[t - 1].argmax() == lt[t - 1].argmax())
            ce -= float(ls[t - 1, ids[t]])
    assert rows[3]["kl"] == pytest.approx(kl, rel=1e-4) and rows[3]["agree"] == agree
    assert rows[3]["ce"] == pytest.approx(ce, rel=1e-5)
