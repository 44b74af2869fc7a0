"""Two DDP processes on CPU (gloo) train to the same weights as one process with the same global batch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import free_port, worker_env

WORKER = Path(__file__).with_name("ddp_worker.py")


def test_two_processes_equal_one(tiny_teacher_dir, tmp_path):
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    subprocess.run([sys.executable, str(WORKER), str(tiny_teacher_dir), str(one), "4", "2"],
                   check=True, env=worker_env(), capture_output=True)  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(WORKER), str(tiny_teacher_dir), str(two), "2", "2", str(tmp_path / "run")]  # fmt: skip
    out = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    # each process's own random state is in the last checkpoint, for its own resume
    last = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1]
    saved = [torch.load(last / f"rng-{rank}.pt", weights_only=True)["torch"] for rank in (0, 1)]
    final = [torch.load(tmp_path / "run" / f"final-rng-{rank}.pt") for rank in (0, 1)]
    assert torch.equal(saved[0], final[0]) and torch.equal(saved[1], final[1])
    assert not torch.equal(final[0], final[1])
    a, b = load_file(one), load_file(two)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    # ...and training did move the weights (the comparison is not between two untouched copies).
    from transformers import AutoModelForCausalLM

    from distill.student.prune import shrink_layers

    init = shrink_layers(AutoModelForCausalLM.from_pretrained(tiny_teacher_dir), [0, 3]).state_dict()
    moved = sum(not torch.equal(init[k], a[k]) for k in a)
    assert moved > len(a) // 2
    # One process with the per-process batch sees half the data: it must differ, which shows
    # the two processes really split the global batch.
    half = tmp_path / "half.safetensors"
    subprocess.run([sys.executable, str(WORKER), str(tiny_teacher_dir), str(half), "2", "2"],
                   check=True, env=worker_env(), capture_output=True)  # fmt: skip
    c = load_file(half)
    assert any(not torch.allclose(c[k], a[k], rtol=1e-4, atol=1e-5) for k in a)
