"""Tiny random models and a locally trained tokenizer, built in the test session; nothing downloaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SENTENCES = [
    "the cat sat on the mat and looked at the dog",
    "what is two plus two? two plus two is four",
    "a teacher model teaches a smaller student model",
    "knowledge distillation keeps most of the quality",
    "hello, how are you today? i am fine, thank you",
    "python is a programming language with clear syntax",
    "the quick brown fox jumps over the lazy dog",
    "numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000",
]


def build_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few sentences, with a ChatML template."""
    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tk.train_from_iterator(SENTENCES * 4, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    tok.chat_template = CHATML
    tok.save_pretrained(folder)
    return tok


def build_llama(folder: Path, tok, layers: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    # Small random weights make near-uniform, boring outputs; a wider init gives a teacher
    # with confident, varied predictions, so distillation has something to learn.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.15)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory) -> Path:
    """A 4-layer random Llama teacher with its tokenizer, as a Hugging Face folder."""
    folder = tmp_path_factory.mktemp("tiny_teacher")
    tok = build_tokenizer(folder)
    build_llama(folder, tok, layers=4, seed=0)
    return folder


@pytest.fixture()
def prompts_file(tmp_path) -> Path:
    rows = [{"id": f"q{i}", "prompt": f"what is {i} plus {i}?", "reference": str(2 * i)} for i in range(12)]
    rows.append({"id": "chat", "messages": [{"role": "user", "content": "hello, how are you?"}]})
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE", os.environ.get("DISTILL_TEST_CACHE", str(tmp_path / "cache")))
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    from distill.core import hardware
    from distill.stages import run_folder

    hardware._DECIDED.clear()  # each test decides its precision afresh (probes may be faked)
    run_folder._CHECKED.clear()


@pytest.fixture()
def tiny_training(tiny_teacher_dir):
    """(teacher, tokenizer, 10 random training examples) for the training-loop tests."""
    from transformers import AutoTokenizer

    teacher = LlamaForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    examples = random_examples(len(tok), 10, 0, lambda i: 3 + i % 4, lambda i: 4 + (i * 3) % 7)
    return teacher, tok, examples


def free_port() -> int:
    """A free TCP port on the loopback, for a torch.distributed rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict:
    """The environment of a test's training subprocess: one thread, the tests folder importable,
    no torch.distributed variables inherited."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def random_examples(
    vocab: int, n: int, seed: int, prompt_len, answer_len
) -> list[tuple[list[int], list[bool]]]:
    """``n`` (ids, answer mask) training examples of random tokens; lengths are functions of i."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        n_prompt, n_answer = prompt_len(i), answer_len(i)
        ids = torch.randint(3, vocab, (n_prompt + n_answer,), generator=g).tolist()
        examples.append((ids, [False] * n_prompt + [True] * n_answer))
    return examples


def tiny_recipe(run_root: Path, teacher: Path, prompts: Path, **sections) -> dict:
    """A recipe dict for the tiny models: a few steps, everything small."""
    recipe = {
        "name": "tiny",
        "runs_dir": str(run_root),
        "data": {"path": str(prompts), "heldout_size": 4},
        "teacher": {"model": str(teacher), "dtype": "float32"},
        "generate": {"max_new_tokens": 12, "batch_size": 4},
        "student": {"init": "shrink", "num_layers": 2},
        "train": {"max_steps": 6, "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 2,
                  "max_seq_len": 64, "lr": 3e-3, "dtype": "float32"},
        "evaluate": {"max_new_tokens": 8, "batch_size": 4, "speed_new_tokens": 4,
                     "speed_batch_size": 2, "speed_repeats": 1},
    }  # fmt: skip
    for k, v in sections.items():
        recipe.setdefault(k, {}).update(v)
    return recipe


def tiny_run(tmp_path: Path, teacher: Path, prompts: Path, stages=("generate", "shrink", "train_student"),
             **sections):  # fmt: skip
    """Write a tiny recipe (``tiny_recipe`` with ``sections``) to tmp_path/r.yaml, load it and run
    the pipeline's ``stages`` in order; returns the loaded config."""
    import yaml

    from distill import pipeline
    from distill.core.recipe import load_config

    (tmp_path / "r.yaml").write_text(
        yaml.safe_dump(tiny_recipe(tmp_path / "runs", teacher, prompts, **sections))
    )
    cfg = load_config(tmp_path / "r.yaml")
    for stage in stages:
        getattr(pipeline, stage)(cfg)
    return cfg
