"""Property-based tests (hypothesis): the prompt readers, the config parser and the cache's shards
on generated inputs. A reader either gives the data back or refuses with its own error naming
the place; a damaged shard is found, never read as data."""

from __future__ import annotations

import json
import shutil
import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.core.config import ConfigError, RunConfig
from distill.core.data import DataError, read_prompts
from distill.core.recipe import load_config, parse_override
from distill.teacher import cache as C

from conftest import random_examples

SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
# prompt text: anything printable JSON can carry, newlines and non-ASCII included, not blank
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=80).filter(str.strip)


ID = st.one_of(st.none(), st.text(string.ascii_letters + string.digits, min_size=1, max_size=8))


@SETTINGS
@given(st.lists(st.tuples(ID, TEXT), min_size=1, max_size=12), st.booleans())
def test_jsonl_prompts_round_trip(tmp_path, rows, ascii_only):
    path = tmp_path / "p.jsonl"
    # ensure_ascii=False writes U+2028, U+0085 etc. raw inside the strings: still one record a line
    lines = (json.dumps({"prompt": t} | ({"id": i} if i else {}), ensure_ascii=ascii_only) for i, t in rows)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    ids = [i for i, _ in rows if i]
    if len(ids) != len(set(ids)):
        with pytest.raises(DataError, match=r"p\.jsonl:\d+: prompt id .* is already used at"):
            read_prompts(path)
        return
    prompts = read_prompts(path)
    assert [p.messages[-1]["content"] for p in prompts] == [t for _, t in rows]
    assert len({p.id for p in prompts}) == len(rows)  # every prompt has its own id


@SETTINGS
@given(st.binary(max_size=400), st.sampled_from(["p.jsonl", "p.txt", "p.csv"]))
def test_any_bytes_in_a_prompt_file_give_prompts_or_a_data_error(tmp_path, blob, name):
    path = tmp_path / name
    path.write_bytes(blob)
    try:
        prompts = read_prompts(path)
    except DataError as exc:
        assert str(path) in str(exc)  # the message names the file
    else:
        assert prompts and all(p.messages[-1]["content"].strip() for p in prompts)


KEY = st.lists(st.text(string.ascii_lowercase + "_", min_size=1, max_size=10), min_size=1, max_size=3)
SCALAR = st.one_of(
    st.integers(-(10**6), 10**6),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(string.ascii_letters + " -", min_size=1, max_size=12),
)


@SETTINGS
@given(KEY, st.one_of(SCALAR, st.lists(SCALAR, max_size=4)))
def test_overrides_parse_back_to_their_values(keys, value):
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
    got_keys, got = parse_override(".".join(keys) + "=" + text)
    assert got_keys == keys and got == value


@SETTINGS
@given(st.text(max_size=60))
def test_any_override_gives_a_config_or_a_config_error(item):
    try:
        cfg = load_config(None, [item])
    except ConfigError:
        return
    assert isinstance(cfg, RunConfig)


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory, tiny_teacher_dir):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    examples = random_examples(len(tok), 6, 1, lambda i: 2 + i % 3, lambda i: 3 + i % 4)
    meta = C.CacheMeta(
        teacher="tiny", teacher_weights_hash=C.weights_hash(tiny_teacher_dir),
        tokenizer_hash=C.tokenizer_hash(tok), vocab_size=len(tok), k=8, scoring_temperature=1.0,
        id_dtype="uint16", logprob_dtype="float16", samples_per_shard=3, num_samples=len(examples),
    )  # fmt: skip
    out = tmp_path_factory.mktemp("cache") / "c"
    C.build_cache(teacher, examples, out, meta, pad_id=tok.pad_token_id)
    expected = {f: getattr(meta, f) for f in ("teacher_weights_hash", "tokenizer_hash", "k",
                                                 "scoring_temperature", "tail_samples")}  # fmt: skip
    return out, examples, expected


@SETTINGS
@given(data=st.data())
def test_a_bit_flipped_or_truncated_shard_is_found_never_read(built_cache, tmp_path, data):
    src, examples, expected = built_cache
    work = tmp_path / f"c{data.draw(st.integers(0, 10**9))}"
    shutil.copytree(src, work)
    shards = sorted(work.glob("shard-*.safetensors"))
    shard = data.draw(st.sampled_from(shards))
    blob = bytearray(shard.read_bytes())
    if data.draw(st.booleans()):  # flip one bit anywhere: header, offsets or data
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] ^= 1 << data.draw(st.integers(0, 7))
    else:  # cut it short anywhere
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    shard.write_bytes(bytes(blob))
    problems = C.verify_cache(work)
    assert len(problems) == 1 and shard.name in problems[0]
    with pytest.raises(C.CacheError, match=shard.stem):
        C.CachedTeacher(work, expected, examples)
    shutil.rmtree(work)
