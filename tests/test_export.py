"""Export for deployment: GGUF files that llama.cpp runs like the student, an HF folder that
serving engines load, the check written into the card, and nothing half-made on failure."""

from __future__ import annotations

import copy
import importlib.util
import json
import math

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from distill import pipeline
from distill.core.config import ConfigError
from distill.core.recipe import load_config
from distill.export.folder import serving_problems
from distill.export.gguf import GGUFExportError, gguf_arch, write_gguf
from distill.student.prune import prune_width

from conftest import build_llama, build_tokenizer, tiny_recipe, tiny_run

needs_llama = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python not installed (make install-llama)",
)
TEXTS = [
    "the cat sat on the mat",
    "what is two plus two?",
    "numbers: 12 100 1000 and 7",
    "hello, how are you today?",
    "python is a programming language",
    "a teacher model teaches a smaller student",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_export")
    tok = build_tokenizer(folder)
    model = build_llama(folder, tok, layers=2, seed=3)
    return folder, tok, model


def _reference_logprobs(model, ids: list[int]) -> np.ndarray:
    """log p(ids[t] | ids[:t]) in float64, from transformers' full forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
    return torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy decoding written out step by step (no generate(), no cache): the reference."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids) :]


def _llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def _llama(path):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2)


def _llama_logprobs(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    s = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
    s = s - s.max(-1, keepdims=True)
    return s[np.arange(len(ids) - 1), ids[1:]] - np.log(np.exp(s).sum(-1))


@needs_llama
def test_f16_gguf_runs_in_llama_cpp_like_transformers(tiny, tmp_path):
    folder, tok, model = tiny
    path = write_gguf(folder, tmp_path / "s-f16.gguf", "f16")
    llm = _llama(path)
    for text in TEXTS:
        # the tokenizer went in whole: llama.cpp splits text into the same ids
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text)["input_ids"]
        ids = tok(text)["input_ids"]
        assert _llama_greedy(llm, ids, 12) == _hf_greedy(model, ids, 12)
        diff = np.abs(_llama_logprobs(llm, ids) - _reference_logprobs(model, ids))
        assert diff.max() < 0.02  # f16 weights: rounding only
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == tok(chat)["input_ids"]
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    assert fields["tokenizer.chat_template"].contents() == tok.chat_template
    assert fields["llama.block_count"].contents() == 2
    assert fields["general.sampling.temp"].contents() == 0.0  # greedy, as generation_config.json says


@needs_llama
def test_q8_0_perplexity_within_one_percent_of_f16(tiny, tmp_path):
    folder, tok, model = tiny
    f16 = _llama(write_gguf(folder, tmp_path / "s-f16.gguf", "f16"))
    q8 = _llama(write_gguf(folder, tmp_path / "s-q8_0.gguf", "q8_0"))
    assert (tmp_path / "s-q8_0.gguf").stat().st_size < 0.7 * (tmp_path / "s-f16.gguf").stat().st_size
    nll = {"f16": [], "q8": []}
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        nll["f16"].extend(-_llama_logprobs(f16, ids))
        nll["q8"].extend(-_llama_logprobs(q8, ids))
    ppl = {k: math.exp(float(np.mean(v))) for k, v in nll.items()}
    assert abs(ppl["q8"] / ppl["f16"] - 1) < 0.01
    assert ppl["q8"] != ppl["f16"]  # it was quantised


@needs_llama
def test_width_pruned_student_keeps_its_shape_in_gguf(tiny, tmp_path):
    """Fewer query heads than hidden / head_dim and a narrower MLP: the file carries both."""
    folder, tok, model = tiny
    pruned = prune_width(model, heads=[[0, 2], [1, 3]], channels=[list(range(0, 64, 2))] * 2)
    pruned.save_pretrained(tmp_path / "pruned")
    tok.save_pretrained(tmp_path / "pruned")
    assert (pruned.config.num_attention_heads, pruned.config.intermediate_size) == (2, 32)
    llm = _llama(write_gguf(tmp_path / "pruned", tmp_path / "p.gguf", "f16"))
    for text in TEXTS[:4]:
        ids = tok(text)["input_ids"]
        assert _llama_greedy(llm, ids, 10) == _hf_greedy(pruned, ids, 10)
        assert np.abs(_llama_logprobs(llm, ids) - _reference_logprobs(pruned, ids)).max() < 0.02


def test_unsupported_students_are_refused_with_the_way_out(tmp_path, tiny_teacher_dir, prompts_file):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=300))
    gpt2.save_pretrained(tmp_path / "gpt2")
    AutoTokenizer.from_pretrained(tiny_teacher_dir).save_pretrained(tmp_path / "gpt2")  # 300 tokens
    with pytest.raises(GGUFExportError, match="convert_hf_to_gguf"):
        gguf_arch(gpt2.config)
    # checked before any work: a run whose export cannot be written does not start
    recipe = tiny_recipe(
        tmp_path / "runs",
        tiny_teacher_dir,
        prompts_file,
        student={"init": "model", "model": str(tmp_path / "gpt2")},
    )
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match="export.formats"):
        pipeline.prepare(load_config(tmp_path / "r.yaml"))
    assert not (tmp_path / "runs").exists()
    pipeline.prepare(load_config(tmp_path / "r.yaml", ["export.formats=[hf]"]))  # the way out works


def test_serving_problems_names_what_is_missing(tiny, tmp_path):
    folder, tok, model = tiny
    model.save_pretrained(tmp_path / "ok")
    tok.save_pretrained(tmp_path / "ok")
    assert serving_problems(tmp_path / "ok") == []
    (tmp_path / "ok" / "generation_config.json").unlink()
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    del cfg["num_key_value_heads"]
    (tmp_path / "ok" / "config.json").write_text(json.dumps(cfg))
    assert serving_problems(tmp_path / "ok") == [
        "config.json has no num_key_value_heads",
        "generation_config.json is missing",
    ]


@needs_llama
def test_export_stage_writes_checks_and_records_every_format(tmp_path, tiny_teacher_dir, prompts_file):
    cfg = tiny_run(
        tmp_path,
        tiny_teacher_dir,
        prompts_file,
        stages=("generate", "shrink", "train_student", "evaluate", "export"),
        export={"check_prompts": 3, "check_new_tokens": 6},
    )
    run = cfg.run_dir
    out = run / "export"
    assert {p.name for p in out.glob("*.gguf")} == {"tiny-f16.gguf", "tiny-q8_0.gguf"}
    assert not (run / "export.tmp").exists()
    assert "FROM ./tiny-q8_0.gguf" in (out / "Modelfile").read_text()
    check = json.loads((run / "export_check.json").read_text())
    assert json.loads((run / "eval.json").read_text())["export_check"] == check
    assert check["prompts"] == 3
    assert check["hf"]["greedy_match"] == 1.0 and check["hf"]["logprob_abs_diff_max"] == 0.0
    assert check["hf"]["serving_problems"] == []
    f16 = check["gguf"]["files"]["f16"]
    assert f16["greedy_match"] == 1.0 and f16["logprob_abs_diff_max"] < 0.02
    assert abs(check["gguf"]["files"]["q8_0"]["perplexity_vs_f16"] - 1) < 0.01
    card = (out / "README.md").read_text()
    assert "## Export check" in card and "tiny-q8_0.gguf (llama.cpp)" in card
    # the HF folder is still a stock model with the trained weights
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    trained = AutoModelForCausalLM.from_pretrained(run / "student").eval()
    ids = AutoTokenizer.from_pretrained(out)("the cat sat", return_tensors="pt").input_ids
    torch.testing.assert_close(exported(ids).logits, trained(ids).logits, rtol=0, atol=0)


def test_gguf_only_export_and_a_failed_export_keeps_the_last_one(
    tmp_path, tiny_teacher_dir, prompts_file, monkeypatch
):
    cfg = tiny_run(
        tmp_path,
        tiny_teacher_dir,
        prompts_file,
        stages=("generate", "shrink", "train_student"),
        export={"formats": ["gguf"], "gguf_types": ["f16"], "check_prompts": 0},
    )
    pipeline.export(cfg)
    out = cfg.run_dir / "export"
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", "tiny-f16.gguf"]
    before = (out / "tiny-f16.gguf").read_bytes()

    def disk_full(*args, **kwargs):
        raise GGUFExportError(f"could not write {out}/tiny-f16.gguf: No space left on device")

    monkeypatch.setattr("distill.export.gguf.write_ggufs", disk_full)
    with pytest.raises(GGUFExportError, match="No space left"):
        pipeline.export(cfg)
    assert (out / "tiny-f16.gguf").read_bytes() == before  # the last good export stays whole
    assert not (cfg.run_dir / "export.tmp").exists()


def test_a_write_error_names_the_file_and_leaves_no_part(tiny, tmp_path, monkeypatch):
    folder, _, _ = tiny

    def full(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("gguf.GGUFWriter.write_tensors_to_file", full)
    with pytest.raises(GGUFExportError, match=r"s-f16\.gguf: No space left on device"):
        write_gguf(folder, tmp_path / "s-f16.gguf", "f16")
    assert list(tmp_path.iterdir()) == []


def test_cli_export_format_gguf(tmp_path, tiny_teacher_dir, prompts_file):
    from typer.testing import CliRunner

    from distill.cli import app

    tiny_run(tmp_path, tiny_teacher_dir, prompts_file, stages=("generate", "shrink", "train_student"))
    res = CliRunner().invoke(
        app,
        [
            "export",
            "--config",
            str(tmp_path / "r.yaml"),
            "--format",
            "gguf",
            "--set",
            "export.gguf_types=[q8_0]",
            "--set",
            "export.check_prompts=0",
        ],
    )
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "runs" / "tiny" / "export").iterdir()) == [
        "Modelfile",
        "README.md",
        "tiny-q8_0.gguf",
    ]
    res = CliRunner().invoke(app, ["export", "--config", str(tmp_path / "r.yaml"), "--format", "onnx"])
    assert res.exit_code == 2 and "export.formats" in res.output


@needs_llama
def test_llama_server_chats_with_the_gguf_alone_through_the_openai_client(tiny, tmp_path):
    """The switch a client makes: the same OpenAI call, a new base_url, the student's own answer."""
    import subprocess
    import sys
    import time
    import urllib.request

    from openai import OpenAI

    from conftest import SENTENCES, free_port

    folder, tok, model = tiny
    model = copy.deepcopy(model).train()  # the module's fixture stays as it was
    # a few seconds of training on chats, so the greedy answers are text, not random bytes
    chats = [
        tok.apply_chat_template(
            [{"role": "user", "content": a}, {"role": "assistant", "content": b}], return_dict=False
        )
        for a, b in zip(SENTENCES, SENTENCES[1:] + SENTENCES[:1], strict=False)
    ]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for step in range(60):
        ids = torch.tensor([chats[step % len(chats)]])
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(tmp_path / "chatty")
    tok.save_pretrained(tmp_path / "chatty")
    path = write_gguf(tmp_path / "chatty", tmp_path / "student-f16.gguf", "f16")
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", "512", "--n_threads", "2"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (
                    tmp_path / "server.log"
                ).read_text()
                time.sleep(0.5)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        for question in SENTENCES[:3]:
            messages = [{"role": "user", "content": question}]
            r = client.chat.completions.create(
                model="student", messages=messages, temperature=0, max_tokens=10
            )
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
            greedy = _hf_greedy(model, ids, 10)
            if tok.eos_token_id in greedy:
                greedy = greedy[: greedy.index(tok.eos_token_id)]
            answer = tok.decode(greedy, skip_special_tokens=True)
            assert len(answer) > 5 and r.choices[0].message.content == answer
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _tiny_gemma3(folder, tok, layers: int = 6, **config):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(5)
    cfg = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
        max_position_embeddings=512, sliding_window=16, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, **config,
    )  # fmt: skip
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.15)
            else:  # Gemma's norms multiply by (1 + w): random w tests the +1 of the export
                p.uniform_(-0.5, 0.5)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model


# Gemma 3 4B and larger: linear rope scaling by 8 on the global layers (the config.json they ship)
LINEAR_8 = {"rope_scaling": {"rope_type": "linear", "factor": 8.0}}


@needs_llama
@pytest.mark.parametrize("config", [{}, LINEAR_8], ids=["unscaled", "linear-8"])
def test_gemma3_student_runs_in_llama_cpp_like_transformers(config, tiny, tmp_path):
    _, tok, _ = tiny
    model = _tiny_gemma3(tmp_path / "g", tok, **config)
    llm = _llama(write_gguf(tmp_path / "g", tmp_path / "g.gguf", "f16"))
    # prompts longer than the sliding window (16), so local and global layers differ
    for text in [" ".join(TEXTS[:3]), " ".join(TEXTS[2:]), TEXTS[0]]:
        ids = tok(text)["input_ids"]
        assert _llama_greedy(llm, ids, 8) == _hf_greedy(model, ids, 8)
        assert np.abs(_llama_logprobs(llm, ids) - _reference_logprobs(model, ids)).max() < 0.03


def test_gemma3_layer_pattern_llama_cpp_cannot_run_is_refused(tiny, tmp_path):
    from distill.student.prune import shrink_layers

    _, tok, _ = tiny
    model = _tiny_gemma3(tmp_path / "g", tok, layers=12)
    ok = shrink_layers(model, [0, 1, 2, 3, 4, 5])  # one whole group of 6: the pattern holds
    gguf_arch(ok.config)
    bad = shrink_layers(model, [0, 1, 2, 3, 5, 6])
    with pytest.raises(GGUFExportError, match=r"global layers are \[4\]"):
        gguf_arch(bad.config)


def _rope_fields(path, arch: str) -> dict:
    from gguf import GGUFReader

    fields, prefix = GGUFReader(str(path)).fields, f"{arch}.rope."
    return {k.removeprefix(prefix): fields[k].contents() for k in fields if k.startswith(prefix)}


def test_linear_rope_scaling_is_written_as_llama_cpp_reads_it(tiny, tmp_path):
    """The keys llama.cpp's converter writes and its loader reads: ``{arch}.rope.scaling.type`` linear
    and ``{arch}.rope.scaling.factor``, for a Gemma 3 student (global layers scaled by 8) and a Llama
    one; a student without scaling gets neither."""
    folder, tok, _ = tiny
    _tiny_gemma3(tmp_path / "g", tok, **LINEAR_8)
    got = _rope_fields(write_gguf(tmp_path / "g", tmp_path / "g.gguf", "f16"), "gemma3")
    assert got["scaling.type"] == "linear" and got["scaling.factor"] == 8.0
    assert got["freq_base"] == 1e6  # the global layers' base; llama.cpp fixes the sliding ones'
    _tiny_gemma3(tmp_path / "plain", tok)
    plain = write_gguf(tmp_path / "plain", tmp_path / "p.gguf", "f16")
    assert "scaling.type" not in _rope_fields(plain, "gemma3")
    llama = AutoModelForCausalLM.from_pretrained(folder)
    llama.config.rope_parameters = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    llama.save_pretrained(tmp_path / "l")
    tok.save_pretrained(tmp_path / "l")
    got = _rope_fields(write_gguf(tmp_path / "l", tmp_path / "l.gguf", "f16"), "llama")
    assert got["scaling.type"] == "linear" and got["scaling.factor"] == 4.0


def test_rope_scaling_the_file_cannot_say_is_refused(tiny, tmp_path):
    """YaRN, dynamic or Llama 3 scaling need keys or tensors the exporter does not write, and
    llama.cpp never scales Gemma 3's sliding layers: refused, not written as if unscaled."""
    from transformers import Gemma3TextConfig, LlamaConfig

    def gemma3(full: dict, sliding: dict):
        rope = {
            "full_attention": {"rope_theta": 1e6, **full},
            "sliding_attention": {"rope_theta": 1e4, **sliding},
        }
        return Gemma3TextConfig(num_hidden_layers=6, rope_parameters=rope)

    default = {"rope_type": "default"}
    assert gguf_arch(gemma3({"rope_type": "linear", "factor": 8.0}, default)) == "gemma3"
    with pytest.raises(GGUFExportError, match="rope scaling of type 'yarn' is not supported"):
        gguf_arch(gemma3({"rope_type": "yarn", "factor": 4.0}, default))
    with pytest.raises(GGUFExportError, match="sliding layers have 'linear' scaling"):
        gguf_arch(gemma3(default, {"rope_type": "linear", "factor": 2.0}))
    with pytest.raises(GGUFExportError, match="rope scaling of type 'dynamic' is not supported"):
        gguf_arch(LlamaConfig(rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    _, tok, _ = tiny
    _tiny_gemma3(tmp_path / "g", tok, rope_parameters={
        "full_attention": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
    })  # fmt: skip
    with pytest.raises(GGUFExportError, match="'yarn'"):
        write_gguf(tmp_path / "g", tmp_path / "g.gguf", "f16")
    assert not list(tmp_path.glob("g.gguf*"))


def test_a_student_scaled_otherwise_than_its_gguf_teacher_is_refused(tiny, tmp_path):
    """The teacher's GGUF (whose tokenizer fields are copied) scales positions by 8; a student whose
    config lost that scaling would run otherwise than the file says: refused. With the same scaling,
    the file has the keys once."""
    _, tok, _ = tiny
    _tiny_gemma3(tmp_path / "teacher", tok, **LINEAR_8)
    teacher = write_gguf(tmp_path / "teacher", tmp_path / "teacher.gguf", "f16")
    _tiny_gemma3(tmp_path / "same", tok, **LINEAR_8)
    same = write_gguf(tmp_path / "same", tmp_path / "s.gguf", "f16", teacher_gguf=teacher)
    assert _rope_fields(same, "gemma3")["scaling.factor"] == 8.0
    _tiny_gemma3(tmp_path / "lost", tok)
    with pytest.raises(GGUFExportError, match=r"GGUF file scales rope positions \(linear, factor 8\)"):
        write_gguf(tmp_path / "lost", tmp_path / "l.gguf", "f16", teacher_gguf=teacher)


def test_a_gguf_teacher_keeps_its_linear_rope_scaling_when_dequantised(tiny, tmp_path):
    """transformers' GGUF loader drops ``{arch}.rope.scaling.*`` (gpt-oss aside): the cached copy
    of a GGUF teacher must scale positions as the file says, on Gemma 3's global layers alone, and
    run like the model the file was written from."""
    from transformers import AutoConfig

    from distill.core.models import convert_gguf

    folder, tok, _ = tiny
    llama = AutoModelForCausalLM.from_pretrained(folder).eval()
    llama.config.rope_parameters = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    llama.save_pretrained(tmp_path / "l")
    tok.save_pretrained(tmp_path / "l")
    converted = convert_gguf(write_gguf(tmp_path / "l", tmp_path / "l.gguf", "f16"), tmp_path / "lc")
    rope = AutoConfig.from_pretrained(converted).rope_parameters
    assert rope["rope_type"] == "linear" and rope["factor"] == 4.0
    ids = torch.tensor([tok(" ".join(TEXTS))["input_ids"]])  # (1, T), T well past 1 / 4 of a turn
    scaled = AutoModelForCausalLM.from_pretrained(tmp_path / "l").eval()  # rotary built scaled
    dequantised = AutoModelForCausalLM.from_pretrained(converted).eval()
    with torch.no_grad():
        assert (dequantised(ids).logits - scaled(ids).logits).abs().max() < 0.01  # f16 weights

    _tiny_gemma3(tmp_path / "g", tok, **LINEAR_8)
    converted = convert_gguf(write_gguf(tmp_path / "g", tmp_path / "g.gguf", "f16"), tmp_path / "gc")
    rope = AutoConfig.from_pretrained(converted).rope_parameters
    assert rope["full_attention"]["rope_type"] == "linear" and rope["full_attention"]["factor"] == 8.0
    assert rope["sliding_attention"]["rope_type"] == "default"


def test_rope_scaling_a_gguf_export_cannot_say_is_refused_before_any_work(tmp_path, tiny, prompts_file):
    """A teacher folder with dynamic rope scaling would train a student the GGUF export then
    refuses: refused at the run's start. A GGUF teacher with YaRN scaling, which its dequantised
    copy could not carry, is refused whatever the export formats."""
    folder, tok, _ = tiny
    teacher = AutoModelForCausalLM.from_pretrained(folder)
    teacher.config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    teacher.save_pretrained(tmp_path / "t")
    tok.save_pretrained(tmp_path / "t")
    recipe = tiny_recipe(tmp_path / "runs", tmp_path / "t", prompts_file)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match="rope scaling of type 'dynamic' is not supported"):
        pipeline.prepare(load_config(tmp_path / "r.yaml"))
    assert not (tmp_path / "runs").exists()
    pipeline.prepare(load_config(tmp_path / "r.yaml", ["export.formats=[hf]"]))  # the way out works

    from distill.core.models import ModelError, gguf_rope_scaling

    meta = {
        "general.architecture": "qwen2",
        "qwen2.rope.scaling.type": "yarn",
        "qwen2.rope.scaling.factor": 4.0,
    }
    with pytest.raises(ModelError, match="rope scaling of type 'yarn' cannot be carried"):
        gguf_rope_scaling(meta, tmp_path / "q.gguf")
    assert gguf_rope_scaling({**meta, "qwen2.rope.scaling.type": "linear"}, tmp_path / "q.gguf") == 4.0
    assert gguf_rope_scaling({"general.architecture": "qwen2"}, tmp_path / "q.gguf") is None


@pytest.mark.parametrize(
    ("alpha", "expected"),
    [
        (1.0, "forward_kl (distillation temperature 1.0) alone"),
        (
            0.5,
            "0.5 x forward_kl (distillation temperature 1.0) + 0.5 x cross-entropy on the teacher's "
            "answer tokens",
        ),
        (0.0, "cross-entropy on the teacher's answer tokens alone"),
    ],
)
def test_the_model_card_names_only_the_loss_terms_that_trained(alpha, expected):
    """At alpha 1 no cross-entropy is computed, at 0 no KD: the card does not list a term of weight 0."""
    from distill.core.config import TrainConfig
    from distill.export.folder import loss_line

    assert loss_line(TrainConfig(alpha=alpha)) == expected
