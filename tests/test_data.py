from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from distill.core.data import (
    DataError,
    Prompt,
    collate,
    make_example,
    prompt_token_ids,
    read_prompts,
    split_prompts,
)


def test_jsonl_prompt_and_messages(prompts_file):
    prompts = read_prompts(prompts_file)
    assert len(prompts) == 13
    assert prompts[0].id == "q0" and prompts[0].reference == "0"
    assert prompts[0].messages == [{"role": "user", "content": "what is 0 plus 0?"}]
    assert prompts[-1].messages[0]["content"] == "hello, how are you?"


def test_bad_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "ok"}\n{"prompt": "ok2"\n')
    with pytest.raises(DataError, match=r"p\.jsonl:2: not valid JSON"):
        read_prompts(p)
    p.write_text('{"prompt": "ok"}\n\n{"question": "no"}\n')
    with pytest.raises(DataError, match=r"p\.jsonl:3: needs a 'prompt' or a 'messages'"):
        read_prompts(p)
    p.write_text('{"messages": [{"role": "user"}]}\n')
    with pytest.raises(DataError, match=r"p\.jsonl:1: every message needs 'role' and 'content'"):
        read_prompts(p)


def test_jsonl_with_unicode_line_breaks_inside_strings(tmp_path):
    """A valid JSON-lines file written with ensure_ascii=False holds U+2028 / U+0085 raw inside its
    strings; records are split at \\n only, so each stays one prompt."""
    texts = ["first\u2028line", "next\u0085line\u2029end", "plain"]
    p = tmp_path / "p.jsonl"
    lines = (json.dumps({"prompt": t}, ensure_ascii=False) + "\n" for t in texts)
    p.write_text("".join(lines), encoding="utf-8")
    assert [x.messages[-1]["content"] for x in read_prompts(p)] == texts


def test_txt_csv_parquet(tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond prompt\n")
    assert [p.messages[0]["content"] for p in read_prompts(tmp_path / "p.txt")] == [
        "first prompt", "second prompt",
    ]  # fmt: skip
    (tmp_path / "p.csv").write_text("id,prompt,reference\na,what is 1+1?,2\nb,hello,\n")
    rows = read_prompts(tmp_path / "p.csv")
    assert [(p.id, p.reference) for p in rows] == [("a", "2"), ("b", None)]
    (tmp_path / "bad.csv").write_text("id,question\na,x\n")
    with pytest.raises(DataError, match=r"bad\.csv:2: needs a 'prompt'"):
        read_prompts(tmp_path / "bad.csv")
    pd = pytest.importorskip("pandas")
    pd.DataFrame({"prompt": ["x", "y"], "reference": ["1", None]}).to_parquet(tmp_path / "p.parquet")
    rows = read_prompts(tmp_path / "p.parquet")
    assert [p.messages[0]["content"] for p in rows] == ["x", "y"] and rows[1].reference is None


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_prompts(tmp_path / "nope.jsonl")
    (tmp_path / "p.xml").write_text("x")
    with pytest.raises(DataError, match="set data.format"):
        read_prompts(tmp_path / "p.xml")


def test_embedded_default_set_has_sources_and_licences():
    prompts = read_prompts(None)
    assert len(prompts) >= 200 and len({p.id for p in prompts}) == len(prompts)
    assert all(p.meta.get("source") and p.meta.get("license") for p in prompts)
    assert sum(p.reference is not None for p in prompts) >= 50


def test_duplicate_content_gets_distinct_ids(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "same"}) + "\n" + json.dumps({"prompt": "same"}) + "\n")
    ids = [x.id for x in read_prompts(p)]
    assert len(set(ids)) == 2


def test_split_is_deterministic_and_order_independent(prompts_file):
    prompts = read_prompts(prompts_file)
    train, held = split_prompts(prompts, 4, seed=3)
    train2, held2 = split_prompts(list(reversed(prompts)), 4, seed=3)
    assert {p.id for p in held} == {p.id for p in held2} and len(held) == 4
    assert not {p.id for p in train} & {p.id for p in held} and len(train) == 9
    with pytest.raises(DataError, match="leaves no training prompts"):
        split_prompts(prompts, 13)


def test_chat_template_applied_and_truncated(tiny_teacher_dir):
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    p = Prompt("x", [{"role": "user", "content": "hello"}])
    ids = prompt_token_ids(tok, p, system_prompt="be brief")
    text = tok.decode(ids)
    want = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n"
    assert text == want + "<|im_start|>assistant\n"


def test_truncation_cuts_the_prompt_text_and_keeps_the_template_head(tiny_teacher_dir):
    """Defect 13: left truncation of the token stream dropped BOS and the system header."""
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    words = " ".join(f"word{i}" for i in range(200))
    p = Prompt("x", [{"role": "user", "content": words}])
    full = prompt_token_ids(tok, p, system_prompt="be brief", max_tokens=100_000)
    ids = prompt_token_ids(tok, p, system_prompt="be brief", max_tokens=60)
    assert len(full) > 60 >= len(ids) >= 50  # cut, and not much more than needed
    text = tok.decode(ids)
    head, tail = (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n",
        "<|im_end|>\n<|im_start|>assistant\n",
    )
    assert text.startswith(head) and text.endswith(tail)
    kept = text[len(head) : -len(tail)]
    assert kept and words.endswith(kept.strip())  # the end of the prompt's own text is what stays
    with pytest.raises(DataError, match="max_prompt_tokens=5"):  # not even the template fits
        prompt_token_ids(tok, p, system_prompt="be brief", max_tokens=5)


def test_make_example_and_collate():
    ids, mask = make_example([1, 2, 3], [7, 8, 9, 10], max_len=6)
    assert ids == [1, 2, 3, 7, 8, 9] and mask == [False] * 3 + [True] * 3
    b = collate([(ids, mask), ([1, 7], [False, True])], pad_id=0)
    assert b.input_ids.tolist() == [[1, 2, 3, 7, 8, 9], [1, 7, 0, 0, 0, 0]]
    assert b.attention_mask.tolist() == [[1] * 6, [1, 1, 0, 0, 0, 0]]
    assert b.num_target_tokens == 4
