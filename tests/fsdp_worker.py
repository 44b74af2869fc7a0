"""Trains the tiny student sharded by FSDP2 (``fully_shard``) over CPU processes (gloo), or as one
plain process; run directly or under torch.distributed.run.

python tests/fsdp_worker.py TEACHER_DIR OUT.safetensors BATCH_SIZE
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

from distill.core.config import TrainConfig
from distill.student.prune import shrink_layers
from distill.teacher.signal import LiveTeacher
from distill.train.checkpoint import full_states
from distill.train.loop import train

from conftest import random_examples


def main(teacher_dir: str, out: str, batch_size: int) -> None:
    torch.set_num_threads(1)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    student = shrink_layers(teacher, [0, 3])
    student.config.tie_word_embeddings = False  # FSDP shards the head and the embedding apart
    student.lm_head.weight = torch.nn.Parameter(student.lm_head.weight.detach().clone())
    vocab = teacher.config.vocab_size
    examples = random_examples(vocab, 12, 0, lambda i: 3 + i % 4, lambda i: 4 + (i * 3) % 7)
    # the plain (B, T, V) loss: the chunked loss reads the LM head's weight outside its forward,
    # where FSDP keeps it sharded
    cfg = TrainConfig(max_steps=3, batch_size=batch_size, warmup_steps=1, lr=5e-3, checkpoint_every=2,
                      dtype="float32", chunked_loss=False, tensorboard=False)  # fmt: skip
    world = int(os.environ.get("WORLD_SIZE", "1"))
    acc = Accelerator(cpu=True)  # starts the gloo process group under torchrun
    if world > 1:
        # accelerate runs FSDP on accelerators only; on CPUs the model is sharded with torch's own
        # fully_shard (FSDP2): each decoder layer, then the root (embeddings, norm, head)
        for layer in student.model.layers:
            fully_shard(layer)
        fully_shard(student)
    with tempfile.TemporaryDirectory() as tmp:
        train(student, LiveTeacher(teacher), examples, cfg, Path(tmp), pad_id=0, accelerator=acc)
        state, _ = full_states(acc, student, torch.optim.SGD(student.parameters()))  # a collective
    if acc.is_main_process:
        save_file({k: v.contiguous().clone() for k, v in state.items()}, out)
        # what FSDP did: each process held a shard (a DTensor) of every parameter, not a copy
        shards = [type(p).__name__ == "DTensor" for p in student.parameters()]
        Path(out + ".json").write_text(json.dumps({"world": world, "sharded": all(shards) and world > 1}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
