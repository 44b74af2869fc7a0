"""Tokenizer audit and the cross-tokenizer parts: two tokenizers trained here (byte-level BPE and
SentencePiece-style Metaspace BPE), alignment by character spans, ULD and span KL by hand."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from typer.testing import CliRunner

from distill.cli import app
from distill.teacher import alignment, crosstok
from distill.teacher.audit import audit_tokenizers

from conftest import SENTENCES, build_llama


@pytest.fixture(scope="module")
def metaspace_tok(tmp_path_factory):
    """A SentencePiece-style tokenizer (Metaspace, 150 tokens): other ids, other merges."""
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    tk.train_from_iterator(SENTENCES * 4, trainers.BpeTrainer(vocab_size=150, special_tokens=specials))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                  unk_token="<unk>")  # fmt: skip
    folder = tmp_path_factory.mktemp("metaspace")
    tok.save_pretrained(folder)
    return folder


def _tok(folder):
    return AutoTokenizer.from_pretrained(folder)


def test_the_audit_tells_the_four_cases_apart(tiny_teacher_dir, metaspace_tok):
    bpe = _tok(tiny_teacher_dir)
    same = audit_tokenizers(bpe, _tok(tiny_teacher_dir))
    assert same.verdict == "same" and same.token_level and all(same.checks.values())
    padded = audit_tokenizers(bpe, _tok(tiny_teacher_dir), len(bpe), len(bpe) + 13)
    assert padded.verdict == "padded" and padded.token_level and "padding" in " ".join(padded.notes)
    extended = _tok(tiny_teacher_dir)
    extended.add_tokens(["<tool>", "</tool>"])
    ext = audit_tokenizers(bpe, extended)
    assert ext.verdict == "extension" and ext.shared_same_id == len(bpe) and ext.student_vocab == len(bpe) + 2
    other = audit_tokenizers(bpe, _tok(metaspace_tok))
    assert other.verdict == "different" and not other.token_level
    assert not other.checks["merges"] and not other.checks["pre-tokenizer"]
    # the same vocabulary with another normaliser: the same text gives other ids, so "different"
    lower = _tok(tiny_teacher_dir)
    lower.backend_tokenizer.normalizer = normalizers.Lowercase()
    rules = audit_tokenizers(bpe, lower)
    assert rules.verdict == "different" and not rules.checks["normalizer"]
    assert "the same vocabulary but other tokenisation rules" in " ".join(rules.notes)


def test_distill_audit_prints_the_verdict(tmp_path, tiny_teacher_dir, metaspace_tok):
    student = tmp_path / "student"
    build_llama(student, _tok(metaspace_tok), layers=1, seed=1)
    out = CliRunner().invoke(app, ["audit", str(tiny_teacher_dir), str(student)])
    assert out.exit_code == 0, out.output
    assert "verdict: different" in out.output and "valid methods:" in out.output
    out = CliRunner().invoke(app, ["audit", str(tiny_teacher_dir), str(tmp_path / "nowhere")])
    assert out.exit_code == 2 and "nowhere" in out.output and "Traceback" not in out.output


def test_a_token_level_loss_between_different_tokenizers_is_refused_before_any_work(
    tmp_path, tiny_teacher_dir, metaspace_tok, prompts_file
):
    import yaml

    from conftest import tiny_recipe

    student = tmp_path / "student"
    build_llama(student, _tok(metaspace_tok), layers=1, seed=1)
    recipe = tiny_recipe(
        tmp_path / "runs", tiny_teacher_dir, prompts_file, student={"init": "model", "model": str(student)}
    )
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = CliRunner().invoke(app, ["generate", "-c", str(tmp_path / "r.yaml")])
    said = " ".join(out.output.split())
    assert out.exit_code == 2 and "verdict: different" in said and "train.alpha=0" in said, out.output
    assert not (tmp_path / "runs" / "tiny").exists()
    # text only (sequence-level KD) is valid for any pair: the check lets it through
    out = CliRunner().invoke(app, ["generate", "-c", str(tmp_path / "r.yaml"), "--set", "train.alpha=0"])
    assert out.exit_code == 0, out.output


def test_alignment_by_character_spans(tiny_teacher_dir, metaspace_tok):
    bpe, sp = _tok(tiny_teacher_dir), _tok(metaspace_tok)
    text = "the cat sat on the mat, two plus two is four"
    t_ids, t_spans = crosstok.token_offsets(bpe, text)
    s_ids, s_spans = crosstok.token_offsets(sp, text)
    chunks = crosstok.align(s_spans, t_spans)
    # every token on both sides in exactly one chunk, in order, chunks tiling the text
    assert [i for c in chunks for i in c.student] == list(range(len(s_ids)))
    assert [i for c in chunks for i in c.teacher] == list(range(len(t_ids)))
    assert chunks[0].start == 0 and chunks[-1].end == len(text)
    assert all(a.end == b.start for a, b in zip(chunks, chunks[1:], strict=False))
    # each chunk is the same text on both sides
    for c in chunks:
        s_text = sp.decode([s_ids[i] for i in c.student]).strip()
        t_text = bpe.decode([t_ids[i] for i in c.teacher]).strip()
        assert s_text == t_text == text[c.start : c.end].strip()
    plus = next(c for c in chunks if text[c.start : c.end] == " plus")
    assert len(plus.student) == 1 and len(plus.teacher) == 3  # "▁plus" vs "Ġp", "lu", "s"
    shares = alignment.alignment_shares(chunks, len(s_ids))
    assert shares["any"] == 1.0 and shares["one_to_one"] == sum(c.one_to_one for c in chunks) / len(s_ids)


def test_alignment_keeps_the_pieces_of_one_character_together():
    # byte-level tokenizers give both pieces of "é" the character's span: no boundary between them
    teacher = [(0, 1), (1, 2), (1, 2), (2, 3)]  # "c", "é"[0], "é"[1], "a"
    student = [(0, 2), (2, 3)]  # "cé", "a"
    chunks = crosstok.align(student, teacher)
    assert [(list(c.student), list(c.teacher)) for c in chunks] == [([0], [0, 1, 2]), ([1], [3])]
    with pytest.raises(crosstok.AlignmentError, match="not the same text"):
        crosstok.align([(0, 3)], [(0, 4)])


def test_token_pieces_read_each_teacher_token_as_the_student_does(tiny_teacher_dir, metaspace_tok):
    bpe, sp = _tok(tiny_teacher_dir), _tok(metaspace_tok)
    pieces = alignment.token_pieces(bpe, sp)
    assert pieces.shape == (len(bpe), 8)
    the_t, the_s = bpe.convert_tokens_to_ids("Ġthe"), sp.convert_tokens_to_ids("▁the")
    assert pieces[the_t].tolist() == [the_s] + [-1] * 7  # " the" in both, though spelt Ġthe and ▁the
    assert (pieces[bpe.pad_token_id] == -1).all()  # special tokens map to nothing
    assert pieces[bpe.eos_token_id, 0] == sp.eos_token_id  # but the two stops are one event
    for teacher, student in ((bpe, sp), (sp, bpe)):
        t_text, s_text = alignment.surfaces(teacher), alignment.surfaces(student)
        table = alignment.token_pieces(teacher, student)
        for t, row in enumerate(table.tolist()):
            got = [i for i in row if i >= 0]
            if got and t != teacher.eos_token_id:  # each teacher token's text, exactly, in student tokens
                assert "".join(s_text[i] for i in got) == t_text[t]
        # mid-word pieces ("lu" of "plus") keep their match though a SentencePiece student reads "lu"
        # alone as a word
        mapped = [t for t, x in enumerate(t_text) if x is not None and x in set(s_text)]
        assert all(table[t, 0] >= 0 for t in mapped) and mapped
    # a teacher token the student reads as several: "▁plus" as "Ġp", "lu", "s"
    plus = alignment.token_pieces(sp, bpe)[sp.convert_tokens_to_ids("▁plus")]
    assert plus.tolist() == bpe.convert_tokens_to_ids(["Ġp", "lu", "s"]) + [-1] * 5
    # byte-level BPE reads "\n\n" before a word as two "\n" tokens: the pieces are those of running text
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train_from_iterator(
        ["a\n\nb", "a\n\n"] * 50,
        trainers.BpeTrainer(
            vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"]
        ),
    )
    byte = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")
    assert byte.tokenize("\n\n") == ["ĊĊ"] and byte.tokenize("\n\nb") == ["Ċ", "Ċ", "b"]
    got = alignment.token_pieces(byte, byte)[byte.convert_tokens_to_ids("ĊĊ")]
    assert got[:3].tolist() == [byte.convert_tokens_to_ids("Ċ")] * 2 + [-1]


def test_piece_rows_by_the_chain_rule_against_hand_values():
    """Teacher tokens 0-4 in student tokens: " dist"+"illation", " dist"+"inct", " dist", " cat",
    none; its top 5 at a chunk's start hold 0.9 of its mass."""
    pieces = torch.tensor([[10, 11, -1], [10, 12, -1], [10, -1, -1], [13, -1, -1], [-1, -1, -1]])
    ids = torch.tensor([[0, 1, 2, 3, 4]]).repeat(4, 1)
    lp = torch.log(torch.tensor([[0.3, 0.2, 0.1, 0.25, 0.05]])).repeat(4, 1)
    read = torch.tensor([[-1, -1, -1], [10, -1, -1], [13, -1, -1], [99, -1, -1]])
    got_ids, got_lp = crosstok.piece_rows(ids, lp, pieces, read, torch.tensor([0, 1, 1, 1]))
    # depth 0: each token's mass to its first piece, undivided
    assert got_ids[0].tolist() == [10, 10, 10, 13, -1]
    torch.testing.assert_close(got_lp[0], lp[0])
    # after " dist": the three tokens that begin so hold 0.6; " dist" alone ends there (the tail)
    assert got_ids[1].tolist() == [11, 12, -1, -1, -1]
    torch.testing.assert_close(got_lp[1, :2].exp(), torch.tensor([0.5, 1 / 3]))
    q = torch.log(torch.tensor([[0.1, 0.1, 0.1] + [0.7 / 11] * 11]))  # a student over ids 0-13
    got = crosstok.span_kl(q, got_ids[1:2], got_lp[1:2])
    r = 0.7 / 11  # ids 11 and 12 against the student's, the ended 1/6 against the rest of its mass
    want = (
        0.5 * math.log(0.5 / r) + (1 / 3) * math.log((1 / 3) / r) + (1 / 6) * math.log((1 / 6) / (1 - 2 * r))
    )
    assert float(got) == pytest.approx(want, rel=1e-5)
    # after " cat": the one token that begins so ends there; after an id no teacher token begins
    # with: no student token either, and no signal
    assert got_ids[2].tolist() == [-1] * 5 and got_ids[3].tolist() == [-1] * 5
    assert torch.isfinite(got_lp).all()
    assert float(crosstok.span_kl(q.repeat(2, 1), got_ids[2:], got_lp[2:])) == pytest.approx(0.0, abs=1e-6)


def test_uld_against_hand_values():
    student = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))  # sorted: 0.5, 0.3, 0.2
    teacher = torch.tensor([[0.6, 0.25, 0.1, 0.05]])
    # |0.5-0.6| + |0.3-0.25| + |0.2-0.1| + |0-0.05| (the student's vocabulary padded with a zero)
    got = crosstok.uld_loss(student, teacher, torch.tensor([0.0]))
    assert float(got) == pytest.approx(0.3, abs=1e-6)
    # the teacher's top 2 only, 0.15 left: ranks past 2 count as one, |0.2 - 0.15|
    got = crosstok.uld_loss(student, teacher[:, :2], torch.tensor([0.15]))
    assert float(got) == pytest.approx(0.1 + 0.05 + 0.05, abs=1e-6)
    # no id is matched: the order of the student's vocabulary does not matter
    again = crosstok.uld_loss(student[:, [2, 0, 1]], teacher, torch.tensor([0.0]))
    assert float(again) == pytest.approx(0.3, abs=1e-6)
    logits = student.clone().requires_grad_(True)
    crosstok.uld_loss(logits, teacher, torch.tensor([0.0]), num_tokens=2).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_span_kl_and_chunk_kl_against_hand_values():
    q = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    # the teacher's top 2: 0.6 on a token the student has (id 0), 0.3 on one it lacks; 0.1 elsewhere
    got = crosstok.span_kl(q, torch.tensor([[0, -1]]), torch.log(torch.tensor([[0.6, 0.3]])))
    want = 0.6 * math.log(0.6 / 0.5) + 0.4 * math.log(0.4 / 0.5)  # the 0.4 unmatched vs the student's 0.5
    assert float(got) == pytest.approx(want, rel=1e-5)
    # two teacher tokens with the same text as student id 1: their mass adds up
    got = crosstok.span_kl(q, torch.tensor([[1, 1]]), torch.log(torch.tensor([[0.3, 0.2]])))
    assert float(got) == pytest.approx(0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75), rel=1e-5)
    # the same distribution on the same ids: zero
    same = crosstok.span_kl(q, torch.tensor([[0, 1, 2]]), q)
    assert float(same) == pytest.approx(0.0, abs=1e-6)
    # a chunk the teacher gives 1/2 and the student 1/4 (chain rule: the sum of its tokens' log-probs)
    ls = torch.log(torch.tensor([0.5])) + torch.log(torch.tensor([0.5]))
    got = crosstok.chunk_kl(ls, torch.log(torch.tensor([0.5])))
    assert float(got) == pytest.approx(0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75), rel=1e-5)


def test_teacher_rows_block_by_block_equal_the_whole():
    torch.manual_seed(0)
    hidden, head = torch.randn(10, 8), torch.randn(40, 8)
    small = crosstok.teacher_rows(hidden, head, 5, with_ids=True, chunk_size=3)
    whole = crosstok.teacher_rows(hidden, head, 5, with_ids=True, chunk_size=100)
    for name in ("sorted", "tail", "ids", "logprobs"):
        torch.testing.assert_close(small[name], whole[name])
    p = torch.softmax(hidden @ head.T, -1)
    top, ids = p.topk(5, -1)
    torch.testing.assert_close(whole["sorted"], top)
    torch.testing.assert_close(whole["tail"], 1 - top.sum(-1))
    assert torch.equal(whole["ids"], ids)
    torch.testing.assert_close(whole["logprobs"], top.log())


def test_a_padded_vocabulary_pair_trains_and_evaluates(tmp_path, tiny_teacher_dir, prompts_file):
    """The audit lets a student whose head is padded past the shared vocabulary through, and the
    padding columns are masked in training and evaluation."""
    import json

    import yaml

    from distill import pipeline
    from distill.core.recipe import load_config
    from distill.teacher.audit import audit_models

    from conftest import tiny_recipe

    tok = _tok(tiny_teacher_dir)
    student = build_llama(tmp_path / "student", tok, layers=2, seed=3)
    student.resize_token_embeddings(len(tok) + 13, mean_resizing=False)
    student.save_pretrained(tmp_path / "student")
    assert audit_models(str(tiny_teacher_dir), str(tmp_path / "student")).verdict == "padded"
    recipe = tiny_recipe(tmp_path / "runs", tiny_teacher_dir, prompts_file,
                         student={"init": "model", "model": str(tmp_path / "student")},
                         evaluate={"measure_memory": False})  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    cfg = load_config(tmp_path / "r.yaml")
    for stage in ("generate", "shrink", "train_student", "evaluate"):
        getattr(pipeline, stage)(cfg)
    res = json.loads((cfg.run_dir / "eval.json").read_text())
    assert math.isfinite(res["student"]["kl"]) and 0 <= res["student"]["top1_agreement"] <= 1
    steps = (cfg.run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(steps) == 6 and all(math.isfinite(json.loads(s)["loss"]) for s in steps)


@pytest.mark.parametrize("method", ["span", "uld", "text"])
def test_a_student_with_its_own_tokenizer_trains_and_evaluates(
    method, tmp_path, tiny_teacher_dir, metaspace_tok, prompts_file
):
    """The real case in small: a byte-level BPE teacher, a SentencePiece-style student. Each method
    trains end to end; the teacher's signal reaches the student's answer tokens; the evaluation
    scores the student in its own tokens (bits per byte; no KL, which would pair ids)."""
    import json

    import yaml

    from distill import pipeline
    from distill.core.recipe import load_config

    from conftest import tiny_recipe

    build_llama(tmp_path / "student", _tok(metaspace_tok), layers=2, seed=4)
    train = {"alpha": 0.0} if method == "text" else {"cross_tokenizer": method, "cross_topk": 16}
    recipe = tiny_recipe(tmp_path / "runs", tiny_teacher_dir, prompts_file,
                         student={"init": "model", "model": str(tmp_path / "student")}, train=train,
                         evaluate={"measure_memory": False}, export={"formats": ["hf"]})  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    cfg = load_config(tmp_path / "r.yaml")
    for stage in ("generate", "shrink", "train_student", "evaluate", "export"):
        getattr(pipeline, stage)(cfg)
    run = cfg.run_dir
    assert _tok(run / "student").get_vocab() == _tok(metaspace_tok).get_vocab()  # it kept its tokenizer
    # the export check reads the teacher's answers in the student's own tokens
    check = json.loads((run / "export_check.json").read_text())
    assert check["prompts"] > 0 and check["hf"]["greedy_match"] == 1.0
    summary = json.loads((run / "train_summary.json").read_text())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    if method == "text":
        assert "student's own tokens" in summary["teacher_signal"] and all(r["kd"] == 0 for r in rows)
    else:
        share = summary["cross_tokenizer_alignment"]
        assert share["any"] > 0.9 and 0 < share["one_to_one"] <= share["any"]
        assert all(r["kd"] > 0 and math.isfinite(r["kd"]) for r in rows)
    res = json.loads((run / "eval.json").read_text())
    assert res["student"]["kl"] is None and res["teacher"]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert 0 < res["student"]["bits_per_byte"] < 50 and res["teacher"]["bits_per_byte"] > 0
    assert "bits_per_byte" in res["intervals"]["kept"]
    # the teacher judges the student's answers in its own tokens: its mean log-prob per token of each
    # answer's text after its own prompt, computed here token by token
    from transformers import AutoModelForCausalLM

    from distill.core.data import prompt_token_ids

    teacher, t_tok = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval(), _tok(tiny_teacher_dir)
    prompts = {p.id: p for p in pipeline.load_split(cfg)[1]}
    outs = [json.loads(x) for x in (run / "eval_answers.jsonl").read_text().splitlines()]
    judged = 0
    for name in ("untrained_student", "student"):
        total, count = 0.0, 0
        for o in (o for o in outs if o["model"] == name):
            ids = t_tok(o["text"], add_special_tokens=False)["input_ids"]
            ids += [t_tok.eos_token_id] if o["finish_reason"] == "stop" else []
            prompt = prompt_token_ids(t_tok, prompts[o["id"]], system_prompt=cfg.data.system_prompt,
                                      max_tokens=cfg.data.max_prompt_tokens)  # fmt: skip
            seq = (prompt + ids)[: cfg.train.max_seq_len]
            with torch.no_grad():
                logp = torch.log_softmax(teacher(torch.tensor([seq])).logits[0].double(), -1)
            for t in range(len(prompt), len(seq)):
                total, count = total + float(logp[t - 1, seq[t]]), count + 1
        if count:  # (a student that learned the tiny teacher's byte soup may answer with no text)
            assert res[name]["teacher_logprob"] == pytest.approx(total / count, rel=1e-4)
        else:
            assert res[name]["teacher_logprob"] is None
        judged += count
    assert judged > 0


def test_the_cross_signal_loss_is_its_parts_on_the_aligned_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 12, requires_grad=True)
    rows = torch.tensor([1, 3, 7])
    sorted_t = torch.softmax(torch.randn(3, 12), -1).sort(-1, descending=True).values
    sig = crosstok.CrossSignal("uld", rows, sorted_t[:, :4], 1 - sorted_t[:, :4].sum(-1))
    got = sig.loss(logits, num_tokens=6)
    flat = logits.reshape(-1, 12)
    want = crosstok.uld_loss(flat[rows], sorted_t[:, :4], 1 - sorted_t[:, :4].sum(-1), num_tokens=6)
    assert float(got.detach()) == pytest.approx(float(want.detach()))
    got.backward()
    touched = logits.grad.reshape(-1, 12).abs().sum(-1).nonzero().squeeze(-1).tolist()
    assert touched == [1, 3, 7]  # only the aligned positions get a gradient
    # span: a multi-token chunk of two student tokens at positions 2 and 4, teacher log-prob log 0.3
    span = crosstok.CrossSignal("span", torch.zeros(0, dtype=torch.long), chunk_rows=torch.tensor([2, 4]),
                                chunk_of=torch.tensor([0, 0]), chunk_labels=torch.tensor([5, 6]),
                                chunk_teacher=torch.log(torch.tensor([0.3])))  # fmt: skip
    lq = torch.log_softmax(flat.detach(), -1)
    student = lq[2, 5] + lq[4, 6]
    want = crosstok.chunk_kl(student[None], torch.log(torch.tensor([0.3])), num_tokens=6)
    assert float(span.loss(logits.detach(), num_tokens=6)) == pytest.approx(float(want), rel=1e-5)
    # train.cross_chunk ce: the chunk's text by its cross-entropy, at full weight
    span.chunk_ce = torch.tensor([True])
    assert float(span.loss(logits.detach(), num_tokens=6)) == pytest.approx(-float(student) / 6, rel=1e-5)


@pytest.mark.parametrize("method", ["span", "uld"])
def test_the_chunked_cross_loss_equals_the_loss_on_whole_logits(method):
    """From hidden states, two positions of logits at a time (a chunk of student tokens straddling
    blocks, a soft-capped head with a bias): the same value and the same gradients for the hidden
    states, the head and its bias as the loss on logits made whole."""
    from distill.losses.fused import LogitTransform

    torch.manual_seed(1)
    hidden = torch.randn(2, 5, 6, requires_grad=True)
    weight = torch.randn(12, 6, requires_grad=True)
    bias = torch.randn(12, requires_grad=True)
    rows = torch.tensor([0, 3, 4, 8])
    top = torch.softmax(torch.randn(4, 12), -1).topk(5, -1)
    if method == "uld":
        sig = crosstok.CrossSignal("uld", rows, top.values, 1 - top.values.sum(-1))
    else:
        ids = torch.where(top.indices % 4 == 0, -1, top.indices)  # some teacher tokens the student lacks
        sig = crosstok.CrossSignal(
            "span", rows, ids=ids, logprobs=top.values.log(), chunk_rows=torch.tensor([1, 2, 5, 6, 7]),
            chunk_of=torch.tensor([0, 0, 1, 1, 1]), chunk_labels=torch.tensor([3, 9, 0, 11, 4]),
            chunk_teacher=torch.log(torch.tensor([0.2, 0.05])),
        )  # fmt: skip
    cap = 3.0
    whole = cap * torch.tanh((hidden @ weight.T + bias) / cap)  # the reference: every logit at once
    want = sig.loss(whole, num_tokens=7)
    want_grads = torch.autograd.grad(want, (hidden, weight, bias))
    cut = LogitTransform(1.0, cap)
    got = sig.chunked_loss(hidden, weight, bias, num_tokens=7, transform=cut, chunk_size=2)
    got_grads = torch.autograd.grad(got, (hidden, weight, bias))
    assert float(want.detach()) > 0 and float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_the_students_own_samples_are_read_again_and_aligned_for_the_teacher(tiny_teacher_dir, metaspace_tok):
    """On-policy: a sample in non-canonical tokens (one token spelled as two pieces) is re-read as
    the student's tokenizer reads its text, and the teacher's signal reaches it; a sample whose
    prompt the teacher was never given gets none."""
    from transformers import AutoModelForCausalLM

    from distill.core.data import collate, make_example

    s_tok, t_tok = _tok(metaspace_tok), _tok(tiny_teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    question = "what is two plus two?"
    s_prompt, t_prompt = s_tok(question)["input_ids"], t_tok(question)["input_ids"]
    text = "the cat sat on the mat"
    canonical = crosstok.student_answer_ids(s_tok, text, True)
    vocab = s_tok.get_vocab()
    split = next(  # the first token that is also two tokens of the vocabulary: (position, its two pieces)
        (n, [vocab[piece[:c]], vocab[piece[c:]]])
        for n, piece in enumerate(s_tok.convert_ids_to_tokens(canonical))
        for c in range(1, len(piece))
        if piece[:c] in vocab and piece[c:] in vocab
    )
    spelled = [*canonical[: split[0]], *split[1], *canonical[split[0] + 1 :]]
    assert s_tok.decode(spelled, skip_special_tokens=True) == text and spelled != canonical
    pieces = alignment.token_pieces(t_tok, s_tok)
    teacher = crosstok.CrossTeacher(model, {}, method="span", k=8, pieces=pieces,
                                    pad_id=t_tok.pad_token_id, tokenizers=(s_tok, t_tok),
                                    prompts={tuple(s_prompt): t_prompt}, max_len=64)  # fmt: skip
    other = s_tok("a prompt nobody gave")["input_ids"]
    got = teacher.retokenize([s_prompt, other], [spelled, canonical], step=3)
    assert got == [canonical, canonical]
    assert teacher.sampled_counts["samples"] == 2 and teacher.sampled_counts["aligned"] == 1
    assert teacher.sampled_counts["retokenized"] == 1
    want = crosstok.build_item(s_prompt, t_prompt, text, s_tok, t_tok, True, 64)
    (item,) = teacher.sampled.values()
    assert item == want
    batch = collate(
        [make_example(s_prompt, canonical, 64), make_example(other, canonical, 64)], s_tok.pad_token_id
    )
    sig = teacher.signal(batch)
    width = batch.input_ids.shape[1] - 1
    # row 0 only: every position of each chunk the teacher reads as one token
    dist = [(c, j) for c in want.chunks if len(c.teacher) == 1 for j in range(len(c.student))]
    assert sig.rows.tolist() == [len(s_prompt) - 1 + c.student[j] for c, j in dist]
    assert all(r < width for r in sig.rows.tolist())
    teacher.retokenize([s_prompt], [canonical], step=4)  # a new step forgets the last one's samples
    assert len(teacher.sampled) == 1 and teacher.sampled_counts["retokenized"] == 1


def test_on_policy_training_across_tokenizers(tmp_path, tiny_teacher_dir, metaspace_tok, prompts_file):
    """The student samples its own answers, the teacher (another tokenizer) grades them by span
    alignment, end to end."""
    import json

    from conftest import tiny_run

    build_llama(tmp_path / "student", _tok(metaspace_tok), layers=2, seed=4)
    cfg = tiny_run(tmp_path, tiny_teacher_dir, prompts_file,
                   student={"init": "model", "model": str(tmp_path / "student")},
                   train={"cross_tokenizer": "span", "cross_topk": 16, "onpolicy_fraction": 0.5,
                          "onpolicy_max_new_tokens": 8})  # fmt: skip
    summary = json.loads((cfg.run_dir / "train_summary.json").read_text())
    on = summary["cross_tokenizer_onpolicy"]
    assert on["samples"] > 0 and on["aligned"] > 0.5 and 0 <= on["one_to_one"] <= 1
    rows = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["onpolicy_rows"] for r in rows) == on["samples"]
    assert all(math.isfinite(r["loss"]) and r["kd"] > 0 for r in rows)


def test_span_rows_inside_a_chunk_the_student_splits_follow_the_chain_rule(
    tmp_path, tiny_teacher_dir, metaspace_tok
):
    """A SentencePiece-style teacher reads " plus" as one token, the byte-level student as three:
    each of the three positions gets a row, the teacher's distribution where it starts the chunk (a
    forward pass made here) carried into the student's tokens after what it has read of the chunk."""
    from distill.core.data import collate, make_example
    from distill.teacher.signal import sample_key

    s_tok, t_tok = _tok(tiny_teacher_dir), _tok(metaspace_tok)
    model = build_llama(tmp_path / "teacher", t_tok, layers=1, seed=2).eval()
    text, question = "two plus two is four", "what is two plus two?"
    s_prompt, t_prompt = s_tok(question)["input_ids"], t_tok(question)["input_ids"]
    answer = crosstok.student_answer_ids(s_tok, text, True)
    item = crosstok.build_item(s_prompt, t_prompt, text, s_tok, t_tok, True, 64)
    ex = make_example(s_prompt, answer, 64)
    k, pieces = len(t_tok), alignment.token_pieces(t_tok, s_tok)  # the teacher's whole distribution
    kw = {"method": "span", "k": k, "pieces": pieces, "pad_id": t_tok.pad_token_id}
    teacher = crosstok.CrossTeacher(model, {sample_key(ex[0]): item}, **kw)
    sig = teacher.signal(collate([ex], s_tok.pad_token_id))
    dist = [(c, j) for c in item.chunks if len(c.teacher) == 1 for j in range(len(c.student))]
    assert sig.rows.tolist() == [len(s_prompt) - 1 + c.student[j] for c, j in dist]
    plus = [n for n, (c, _) in enumerate(dist) if text[c.start : c.end] == " plus"]
    assert len(plus) == 3  # " plus": "Ġp", "lu", "s"
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([item.teacher_ids])).logits[0].float(), -1)
    for n, (c, j) in enumerate(dist):
        top = logp[item.teacher_start - 1 + c.teacher[0]].topk(k)
        read = torch.full((1, 8), -1)
        read[0, :j] = torch.tensor(answer[c.student[0] : c.student[0] + j])
        ids, lp = crosstok.piece_rows(
            top.indices[None], top.values[None], teacher.pieces, read, torch.tensor([j])
        )
        assert sig.ids[n].tolist() == ids[0].tolist()
        torch.testing.assert_close(sig.logprobs[n], lp[0], rtol=1e-4, atol=1e-5)
    # after "Ġp" the row holds only teacher tokens whose text goes on from " p", divided by their mass
    row, lu = plus[1], s_tok.convert_tokens_to_ids("lu")
    kept = sig.ids[row] >= 0
    assert lu in sig.ids[row].tolist() and float(sig.logprobs[row][kept].exp().sum()) <= 1 + 1e-5
    begins = pieces[:, 0] == s_tok.convert_tokens_to_ids("Ġp")  # "▁plus", "▁p", ...
    want = logp[item.teacher_start - 1 + dist[row][0].teacher[0]].exp()
    share = float(want[begins & (pieces[:, 1] == lu)].sum() / want[begins].sum())  # those going on "lu"
    assert float(sig.logprobs[row][sig.ids[row] == lu].exp().sum()) == pytest.approx(share, rel=1e-4)


def _teacher_of_its_own_logits(kind: str, t_tok, folder):
    """A tiny teacher that does more to its logits than ``hidden @ head.T``: a bias on its LM head
    (``bias``), Gemma 2's soft-capping (``softcap``), or a scale no config declares (``hidden``)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    if kind == "softcap":
        torch.manual_seed(6)
        cfg = Gemma2Config(vocab_size=len(t_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                           final_logit_softcapping=2.0, pad_token_id=t_tok.pad_token_id)  # fmt: skip
        model = Gemma2ForCausalLM(cfg).eval()
        with torch.no_grad():
            model.lm_head.weight.mul_(40)  # logits large enough that the cap bites
        return model
    model = build_llama(folder, t_tok, layers=1, seed=6)
    if kind == "bias":
        head = torch.nn.Linear(32, len(t_tok), bias=True)
        with torch.no_grad():
            head.weight.copy_(model.lm_head.weight)
            head.bias.normal_(0, 2.0)  # large enough to reorder the top tokens
        model.lm_head = head
    else:
        model.lm_head.register_forward_hook(lambda mod, args, out: out * 3)
    return model


def _one_sample(s_tok, t_tok, text: str):
    """(the sample's key, its item, a batch of it) for ``text`` answering one question."""
    from distill.core.data import collate, make_example
    from distill.teacher.signal import sample_key

    s_prompt, t_prompt = s_tok("question?")["input_ids"], t_tok("question?")["input_ids"]
    ex = make_example(s_prompt, crosstok.student_answer_ids(s_tok, text, True), 64)
    item = crosstok.build_item(s_prompt, t_prompt, text, s_tok, t_tok, True, 64)
    return sample_key(ex[0]), item, collate([ex], s_tok.pad_token_id)


@pytest.mark.parametrize("kind", ["bias", "softcap"])
def test_the_cross_teacher_signal_is_made_from_the_models_own_logits(
    kind, tmp_path, tiny_teacher_dir, metaspace_tok
):
    """The teacher's signal, made from its final hidden states block by block, equals the one from
    the logits the model itself returns: with a bias on its LM head and with soft-capped logits, for
    its top-k probabilities (ULD) and its probabilities of the multi-token chunks (span)."""
    s_tok, t_tok = _tok(metaspace_tok), _tok(tiny_teacher_dir)
    model = _teacher_of_its_own_logits(kind, t_tok, tmp_path / "teacher")
    key, item, batch = _one_sample(s_tok, t_tok, "two plus two is four")  # words the teacher splits
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([item.teacher_ids])).logits[0].float(), -1)  # (T_t, V_t)
    base = item.teacher_start - 1  # the position that predicts the teacher's answer token 0
    kw = {"k": 8, "pad_id": t_tok.pad_token_id}
    uld = crosstok.CrossTeacher(model, {key: item}, method="uld", pieces=None, **kw).signal(batch)
    want = torch.stack([logp[base + c.teacher[0]].topk(8).values.exp() for c in item.chunks])
    torch.testing.assert_close(uld.sorted, want, rtol=1e-4, atol=1e-5)
    pieces = alignment.token_pieces(t_tok, s_tok)
    span = crosstok.CrossTeacher(model, {key: item}, method="span", pieces=pieces, **kw).signal(batch)
    multi = [c for c in item.chunks if len(c.teacher) > 1]
    assert multi
    t_ids = item.teacher_ids
    want = torch.stack([sum(logp[base + j, t_ids[item.teacher_start + j]] for j in c.teacher) for c in multi])
    torch.testing.assert_close(span.chunk_teacher, want, rtol=1e-4, atol=1e-5)


def test_a_cross_teacher_whose_logits_are_not_its_heads_is_refused(tmp_path, tiny_teacher_dir, metaspace_tok):
    """A model that scales its logits without a config key saying so: its head's output is not its
    logits, and the signal would be another distribution than the model's. Refused, with the reason."""
    from distill.core.models import ModelError

    s_tok, t_tok = _tok(metaspace_tok), _tok(tiny_teacher_dir)
    model = _teacher_of_its_own_logits("hidden", t_tok, tmp_path / "teacher")
    key, item, batch = _one_sample(s_tok, t_tok, "the cat sat on the mat")
    teacher = crosstok.CrossTeacher(model, {key: item}, method="uld", k=8, pieces=None,
                                    pad_id=t_tok.pad_token_id)  # fmt: skip
    with pytest.raises(ModelError, match="LlamaForCausalLM makes its logits some other way.*differ by up to"):
        teacher.signal(batch)


@pytest.mark.parametrize("method", ["span", "uld"])
def test_a_cross_tokenizer_cache_gives_the_live_signal(method, tmp_path, tiny_teacher_dir, metaspace_tok):
    """The teacher's side of each sample written to shards and read back: the batch's signal and loss
    equal the live teacher's (log-probs stored in float16); a sample the cache does not hold (the
    student's own) is graded by the model given."""
    from transformers import AutoModelForCausalLM

    from distill.core.data import collate, make_example
    from distill.teacher.cache import CachedCrossTeacher, CacheError, CacheMeta, build_cross_cache
    from distill.teacher.signal import sample_key

    s_tok, t_tok = _tok(metaspace_tok), _tok(tiny_teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    texts = ["the cat sat on the mat", "two plus two is four", "a dog ran after the ball"]
    items, examples = {}, []
    for n, text in enumerate(texts):
        q = f"question {n}?"
        s_prompt, t_prompt = s_tok(q)["input_ids"], t_tok(q)["input_ids"]
        ex = make_example(s_prompt, crosstok.student_answer_ids(s_tok, text, True), 64)
        items[sample_key(ex[0])] = crosstok.build_item(s_prompt, t_prompt, text, s_tok, t_tok, True, 64)
        examples.append(ex)
    pieces = alignment.token_pieces(t_tok, s_tok) if method == "span" else None
    kw = {"method": method, "k": 8, "pieces": pieces, "pad_id": t_tok.pad_token_id}
    live = crosstok.CrossTeacher(model, items, **kw)
    expected = {"teacher": "tiny", "teacher_weights_hash": "w", "tokenizer_hash": "t", "k": 8,
                "scoring_temperature": 1.0, "tail_samples": 0, "cross_tokenizer": method,
                "student_tokenizer_hash": "s"}  # fmt: skip
    meta = CacheMeta(**expected, vocab_size=len(s_tok), id_dtype="int32", logprob_dtype="float16",
                     samples_per_shard=2, num_samples=len(items))  # fmt: skip
    build_cross_cache(live, tmp_path / "cache", meta, batch_size=2)
    assert len(list((tmp_path / "cache").glob("shard-*.safetensors"))) == 2
    # the first two samples come from the cache; the third, left out of it, from the model given
    held = dict(list(items.items())[:2])
    cached = CachedCrossTeacher(tmp_path / "cache", expected, held, model=model, **kw)
    cached.sampled = {k: v for k, v in items.items() if k not in held}
    del cached.where[next(k for k in items if k not in held)]
    batch = collate(examples, s_tok.pad_token_id)
    want, got = live.signal(batch), cached.signal(batch)
    assert got.rows.tolist() == want.rows.tolist() and got.rows.numel() > 0
    for name in (
        "ids",
        "logprobs",
        "sorted",
        "tail",
        "chunk_rows",
        "chunk_of",
        "chunk_labels",
        "chunk_teacher",
    ):
        w, g = getattr(want, name), getattr(got, name)
        assert (w is None) == (g is None), name
        if w is not None and w.dtype == torch.long:
            assert g.tolist() == w.tolist(), name
        elif w is not None:
            torch.testing.assert_close(g, w.float(), rtol=2e-3, atol=2e-3)
    if method == "span":
        assert want.chunk_teacher is not None and want.chunk_teacher.numel() > 0
        # with chunks taught by their CE, only the teacher's answers' chunks are; the student's own
        # samples (on-policy) keep the Bernoulli KL: their tokens are no target
        mixed = crosstok.CrossTeacher(model, held, **kw, chunk_loss="ce")
        mixed.sampled = cached.sampled
        sig = mixed.signal(batch)
        own = sum(len(live._multi_chunks(it)) for it in cached.sampled.values())
        assert sig.chunk_ce.tolist() == [True] * (len(sig.chunk_teacher) - own) + [False] * own
        assert own > 0 and sig.chunk_ce.any()
    logits = torch.randn(*batch.input_ids.shape[:1], batch.input_ids.shape[1] - 1, len(s_tok))
    assert float(got.loss(logits, num_tokens=10)) == pytest.approx(
        float(want.loss(logits, num_tokens=10)), rel=1e-3
    )
    with pytest.raises(CacheError, match="cross_rows"):  # made with other rows (an older release): refused
        CachedCrossTeacher(
            tmp_path / "cache", {**expected, "cross_rows": crosstok.CROSS_ROWS[method]}, held, **kw
        )
    with pytest.raises(CacheError, match="cross_tokenizer"):  # made for the other method: refused
        CachedCrossTeacher(tmp_path / "cache", {**expected, "cross_tokenizer": "other"}, held, **kw)
    with pytest.raises(CacheError, match="lacks 1 of 4"):
        CachedCrossTeacher(tmp_path / "cache", expected, {**items, "x": items[next(iter(items))]}, **kw)


def test_training_across_tokenizers_from_the_cache_never_loads_the_teacher(
    tmp_path, tiny_teacher_dir, metaspace_tok, prompts_file, monkeypatch
):
    """`distill cache` on a run across tokenizers writes the span signal; training then reads it and
    the teacher is never loaded, and the student learns what the live teacher teaches it (equal
    losses, step by step, up to the cache's float16)."""
    import json

    from distill import pipeline
    from distill.core.recipe import load_config
    from distill.teacher import factory
    from distill.teacher.cache import CacheError

    from conftest import tiny_run

    build_llama(tmp_path / "student", _tok(metaspace_tok), layers=2, seed=4)
    student = {"init": "model", "model": str(tmp_path / "student")}
    train = {"cross_tokenizer": "span", "cross_topk": 16, "max_steps": 3}
    for d in ("live", "cached"):
        (tmp_path / d).mkdir()
    live = tiny_run(tmp_path / "live", tiny_teacher_dir, prompts_file, student=student, train=train)
    cfg = tiny_run(tmp_path / "cached", tiny_teacher_dir, prompts_file, stages=("generate", "shrink"),
                   student=student, train=train, cache={"use": True, "samples_per_shard": 3})  # fmt: skip
    pipeline.build_teacher_cache(cfg)
    meta = json.loads((cfg.run_dir / "teacher_cache" / "meta.json").read_text())
    assert meta["cross_tokenizer"] == "span" and meta["k"] == 16 and meta["num_samples"] > 3

    def no_teacher(*a, **k):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(factory, "training_teacher", no_teacher)
    pipeline.train_student(cfg)
    summary = json.loads((cfg.run_dir / "train_summary.json").read_text())
    assert summary["teacher_signal"].startswith("cached teacher, another tokenizer: span")
    rows = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in (live.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len(want) == 3
    for r, w in zip(rows, want, strict=True):
        assert r["kd"] == pytest.approx(w["kd"], rel=1e-2) and r["ce"] == pytest.approx(w["ce"], rel=1e-2)
    # a cache made for span does not serve ULD: refused, naming the field
    (tmp_path / "cached" / "r.yaml").write_text(
        (tmp_path / "cached" / "r.yaml").read_text().replace("cross_tokenizer: span", "cross_tokenizer: uld")
    )
    with pytest.raises(CacheError, match="cross_tokenizer: cache has 'span', run needs 'uld'"):
        pipeline.train_student(load_config(tmp_path / "cached" / "r.yaml"), resume=False)
