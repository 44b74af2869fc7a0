"""The embedded prompt sets default.jsonl and large.jsonl: no prompt is a benchmark prompt (the
quality validation prompts included) or a scored task's, no added row holds a line of a benchmark
prompt (the original rows share one instruction line with the quality prompts), every row names a
source and a licence, the sets cover the instruction formats and large.jsonl holds default's rows in
order."""

from __future__ import annotations

import json
import re
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest
from test_bench_splits import norm, task_texts  # how the benchmark splits are kept apart

from distill.core.data import read_prompts

DATA = Path(__file__).resolve().parents[1] / "bench" / "data"
LICENCES = {"BSD-3-Clause", "Apache-2.0", "PSF-2.0"}
ORIGINAL = re.compile(r"p\d{4}")  # the ids of the original 300 rows
FORMATS = ["classify", "summarise", "extract", "rewrite", "brief", "format"]


def embedded(name: str) -> tuple[list, list[dict]]:
    """The prompts and raw rows of prompts/<name>.jsonl as shipped in the package."""
    text = resources.files("distill").joinpath(f"prompts/{name}.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return read_prompts(resources.files("distill").joinpath(f"prompts/{name}.jsonl")), rows


def user_text(prompt) -> str:
    return "\n".join(m["content"] for m in prompt.messages if m["role"] == "user")


def benchmark_texts() -> tuple[set[str], set[str]]:
    """The benchmarks' prompts, and their lines of six or more words (normalised)."""
    whole, lines = set(), set()
    for path in sorted(DATA.glob("*.jsonl")):
        for p in read_prompts(path):
            text = user_text(p)
            whole.add(norm(text))
            lines |= {norm(x) for x in text.splitlines() if len(norm(x).split()) >= 6}
    return whole, lines


@pytest.mark.parametrize("name", ["default", "large"])
def test_the_quality_validation_prompts_are_kept_out(name):
    prompts, _ = embedded(name)
    validation = read_prompts(DATA / "quality_validation_prompts.jsonl")
    assert not {p.id for p in prompts} & {p.id for p in validation}
    assert not {norm(user_text(p)) for p in prompts} & {norm(user_text(p)) for p in validation}


@pytest.mark.parametrize("name", ["default", "large"])
def test_rows_are_apart_from_benchmarks_and_tasks(name):
    prompts, _ = embedded(name)
    whole, lines = benchmark_texts()
    tasks = task_texts()
    for p in prompts:
        text = norm(user_text(p))
        assert text not in whole, f"{name}: {p.id} is a benchmark prompt"
        assert text not in tasks, f"{name}: {p.id} is a prompt of a scored task"
        if ORIGINAL.fullmatch(p.id):  # the original rows share the quality prompts' instruction line
            continue
        inside = [line for line in lines if line in text]
        assert not inside, f"{name}: {p.id} contains a benchmark line: {inside[0]!r}"


@pytest.mark.parametrize("name", ["default", "large"])
def test_rows_are_unique_and_name_source_and_licence(name):
    prompts, rows = embedded(name)
    texts = [norm(user_text(p)) for p in prompts]
    assert len(set(texts)) == len(texts), f"{name} repeats a prompt"
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert r["source"].strip() and r["license"] in LICENCES, r


def test_default_keeps_the_original_rows_and_covers_every_format():
    _, rows = embedded("default")
    validation = {p.id for p in read_prompts(DATA / "quality_validation_prompts.jsonl")}
    original = [f"p{i:04d}" for i in range(300) if f"p{i:04d}" not in validation]
    assert 800 <= len(rows) <= 1000
    assert [r["id"] for r in rows[: len(original)]] == original
    assert not any(ORIGINAL.fullmatch(r["id"]) for r in rows[len(original) :])
    instructions = [r["source"].split(" ")[0] for r in rows if r["source"].startswith("instruction/")]
    kinds = Counter(source.split("/")[1] for source in instructions)
    for kind in FORMATS:
        assert kinds[kind] >= 30, (kind, kinds)
    assert sum(r["source"].startswith("cpython/docstring/") for r in rows) >= 50
    other_maths = [r for r in rows if r["source"].startswith(("mathematics_dataset/numbers/",
                   "mathematics_dataset/comparison/", "mathematics_dataset/measurement/"))]  # fmt: skip
    assert len(other_maths) >= 50 and all(r.get("reference") for r in other_maths)
    assert all(len(r["prompt"]) <= 900 for r in rows[len(original) :])


def test_large_holds_the_default_rows_in_order():
    """default.jsonl is large.jsonl's first 638 rows and every sixth row after them (its widening)."""
    _, small = embedded("default")
    _, large = embedded("large")
    assert len(large) >= len(small) + 1000
    assert small == large[:638] + large[638::6]  # ids, text and order
    assert len(resources.files("distill").joinpath("prompts/large.jsonl").read_bytes()) < 1_500_000


@pytest.mark.parametrize("name", ["default", "large"])
def test_every_classify_row_names_the_labels_it_asks_for(name):
    """The labelling asks carry ``choices`` (for ``filter.verify_choices``): two or more labels, each
    written in the prompt, no reference to give the answer away; other rows carry none."""
    prompts, rows = embedded(name)
    classify = [r for r in rows if r["source"].startswith("instruction/classify ")]
    assert len(classify) >= 30 and all("choices" in r for r in classify)
    fmt = [r for r in rows if r["source"].startswith("instruction/format ")]
    yes_no = [r for r in fmt if "yes or no" in r["prompt"].lower()]
    assert yes_no and all(r.get("choices") == ["yes", "no"] for r in yes_no)
    for r, p in zip(rows, prompts, strict=True):
        if "choices" not in r:
            assert "choices" not in p.meta
            continue
        assert r["source"].startswith(("instruction/classify ", "instruction/format ")), r["id"]
        assert len(set(r["choices"])) == len(r["choices"]) >= 2 and "reference" not in r, r
        assert all(re.search(rf"(?<!\w){re.escape(c)}(?!\w)", r["prompt"], re.I) for c in r["choices"]), r
        assert p.meta["choices"] == r["choices"]
