"""Trains the tiny student; run directly (1 process) or under torch.distributed.run (DDP).

python tests/ddp_worker.py TEACHER_DIR OUT.safetensors BATCH_SIZE GRAD_ACCUM [RUN_DIR]

RUN_DIR: train there (checkpoints kept), each process drawing CPU random numbers of its own on
the side, and write each one's final CPU random state as RUN_DIR/final-rng-{rank}.pt.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from distill.core.config import TrainConfig
from distill.student.prune import shrink_layers
from distill.teacher.signal import LiveTeacher
from distill.train.loop import train

from conftest import random_examples


class RankDrawingTeacher(LiveTeacher):
    """A live teacher that moves this process's CPU generator by ``1 + rank`` draws per batch (its
    signal unchanged), so that the processes' random states differ as they do with dropout."""

    def signal(self, batch, **kwargs):
        torch.rand(1 + int(os.environ.get("RANK", "0")))
        return super().signal(batch, **kwargs)


def main(teacher_dir: str, out: str, batch_size: int, grad_accum: int, run_dir: str | None = None) -> None:
    torch.set_num_threads(1)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    student = shrink_layers(teacher, [0, 3])
    vocab = teacher.config.vocab_size
    examples = random_examples(vocab, 12, 0, lambda i: 3 + i % 4, lambda i: 4 + (i * 3) % 7)
    cfg = TrainConfig(max_steps=3, batch_size=batch_size, grad_accum=grad_accum, warmup_steps=1, lr=5e-3,
                      checkpoint_every=100, dtype="float32")  # fmt: skip
    rank = int(os.environ.get("RANK", "0"))
    if run_dir is not None:
        train(student, RankDrawingTeacher(teacher), examples, cfg, Path(run_dir), pad_id=0)
        torch.save(torch.get_rng_state(), Path(run_dir) / f"final-rng-{rank}.pt")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            train(student, LiveTeacher(teacher), examples, cfg, Path(tmp), pad_id=0)
    # train() made its own Accelerator, so it ends it: no process group is left to abort at exit
    assert not torch.distributed.is_initialized(), "train() left its process group behind"
    if rank == 0:
        save_file({k: v.contiguous().clone() for k, v in student.state_dict().items()}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), *sys.argv[5:])
