"""On-policy distillation (GKD, Agarwal et al. 2024): the student writes the answers it learns from.

For a share λ of each micro-batch's sequences, the teacher's answer is replaced by one the student
samples itself (KV-cached ``generate``, its own sampling temperature). The teacher then scores every
token of that answer in one forward pass, and the loss is a divergence (``train.onpolicy_loss``,
JSD by default) on those positions alone. There is no cross-entropy term: the student's own tokens
are not targets. The other sequences keep the usual off-policy loss. λ = 0 is the off-policy path,
untouched.

Which rows go on-policy and what the student samples are seeded by (seed, step, micro-batch,
process), with the global RNG restored afterwards, so a resumed run samples what an uninterrupted
one would have.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from transformers import GenerationConfig

from distill.core.config import TrainConfig
from distill.core.data import Batch, collate, make_example, pack, prompt_part
from distill.core.generation import generate_batch

Example = tuple[list[int], list[bool]]


def fraction_at(step: int, cfg: TrainConfig) -> float:
    """λ at optimizer step ``step``: constant, or rising linearly from 0 to ``onpolicy_fraction``."""
    if cfg.onpolicy_schedule == "linear":
        return cfg.onpolicy_fraction * min(1.0, step / max(1, cfg.max_steps - 1))
    return cfg.onpolicy_fraction


def _rows(batch: Batch) -> list[Example]:
    """The batch's sequences as (ids, answer mask) pairs, padding removed (packed rows unpacked)."""
    ids, mask = batch.input_ids.tolist(), batch.answer_mask.tolist()
    return [(ids[r][s : s + n], mask[r][s : s + n]) for r, s, n in batch.samples()]


def plain_sampling(own: GenerationConfig, temperature: float) -> GenerationConfig:
    """Sampling from the whole distribution at ``temperature`` and nothing else: ``own``'s end,
    padding and start tokens, none of its sampling settings (repetition penalty, top-k, top-p, min-p,
    n-gram bans, suppressed tokens, ...)."""
    return GenerationConfig(
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        eos_token_id=own.eos_token_id,
        pad_token_id=own.pad_token_id,
        bos_token_id=own.bos_token_id,
    )


@contextmanager
def _sampling_config(model: torch.nn.Module, temperature: float) -> Iterator[None]:
    """The model's generation config is ``plain_sampling`` for the duration. ``generate`` fills
    every setting a call leaves unset from the model's own config, so overriding some settings
    would let the others (a ``repetition_penalty`` or ``min_p`` of the model's
    ``generation_config.json``) through: the samples would not be from the student's distribution.
    Under PEFT the config is the wrapped model's, which the wrapper reads and copies at each call."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    own = inner.generation_config
    inner.generation_config = plain_sampling(own, temperature)
    try:
        yield
    finally:
        inner.generation_config = own


def sample_answers(
    student: torch.nn.Module,
    prompts: list[list[int]],
    cfg: TrainConfig,
    pad_id: int,
    seed: int,
    full_length: bool = False,
) -> list[list[int]]:
    """The student's own answers to ``prompts`` (token ids, cut after the first end-of-sequence),
    sampled from its whole distribution at ``cfg.onpolicy_temperature`` whatever its own generation
    config says (``plain_sampling``); the global RNGs (the CPU's and every GPU's) are restored
    afterwards, so sampling leaves the training stream as it was. ``full_length``: no answer ends
    before ``cfg.onpolicy_max_new_tokens`` (the time plan's probe: the longest call)."""
    model = getattr(student, "module", student)
    was_training = model.training
    model.eval()
    try:
        # manual_seed seeds the GPUs too: their states are restored with the CPU's
        with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
            torch.manual_seed(seed)
            device = next(model.parameters()).device.type
            autocast = torch.autocast(device, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
            with autocast, _sampling_config(model, cfg.onpolicy_temperature):
                gens = generate_batch(
                    model, None, prompts, max_new_tokens=cfg.onpolicy_max_new_tokens, do_sample=True,
                    generation_temperature=cfg.onpolicy_temperature, top_p=1.0, top_k=0, pad_id=pad_id,
                    min_new_tokens=cfg.onpolicy_max_new_tokens if full_length else 0,
                )  # fmt: skip
    finally:
        model.train(was_training)
    return [g.token_ids for g in gens]


def mix(
    batch: Batch,
    student: torch.nn.Module,
    cfg: TrainConfig,
    pad_id: int,
    *,
    step: int,
    micro: int,
    rank: int,
    retokenize=None,
) -> list[tuple[Batch, bool]]:
    """The micro-batch as ``(batch, on_policy)`` parts: the rows kept off-policy, and the rows whose
    answers the student sampled (each row independently with probability λ at this step).
    ``retokenize(prompts, answers, step=)``: the samples as the grader will read them (a teacher with
    another tokenizer re-reads their text)."""
    lam = fraction_at(step, cfg)
    rows = _rows(batch)
    seed = ((cfg.seed * 1_000_003 + step) * 1_009 + micro) * 101 + rank
    rng = random.Random(seed)
    chosen = [rng.random() < lam for _ in rows]
    if not any(chosen):
        return [(batch, False)]
    prompts = [prompt_part(ids, m) for (ids, m), c in zip(rows, chosen, strict=True) if c]
    answers = sample_answers(student, prompts, cfg, pad_id, seed % 2**63)
    if retokenize is not None:
        answers = retokenize(prompts, answers, step=step)
    on = [make_example(p, a, cfg.max_seq_len) for p, a in zip(prompts, answers, strict=True)]
    off = [r for r, c in zip(rows, chosen, strict=True) if not c]
    device = batch.input_ids.device

    def build(examples: list[Example]) -> Batch:
        made = pack(examples, pad_id, cfg.max_seq_len) if cfg.packing else collate(examples, pad_id)
        return made.to(device)

    return ([(build(off), False)] if off else []) + [(build(on), True)]
