"""Trains the tiny student; run directly (1 process) or under torch.distributed.run (DDP).

python tests/ddp_worker.py TEACHER_DIR OUT.safetensors BATCH_SIZE GRAD_ACCUM
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from distill.config import TrainConfig
from distill.models import shrink_layers
from distill.teacher import LiveTeacher
from distill.train import train

from conftest import random_examples


def main(teacher_dir: str, out: str, batch_size: int, grad_accum: int) -> None:
    torch.set_num_threads(1)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    student = shrink_layers(teacher, [0, 3])
    vocab = teacher.config.vocab_size
    examples = random_examples(vocab, 12, 0, lambda i: 3 + i % 4, lambda i: 4 + (i * 3) % 7)
    cfg = TrainConfig(max_steps=3, batch_size=batch_size, grad_accum=grad_accum, warmup_steps=1, lr=5e-3,
                      checkpoint_every=100, dtype="float32")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        train(student, LiveTeacher(teacher), examples, cfg, Path(tmp), pad_id=0)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        save_file({k: v.contiguous().clone() for k, v in student.state_dict().items()}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
