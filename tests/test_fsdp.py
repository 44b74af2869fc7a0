"""Two FSDP2 processes on CPU (gloo, torch's ``fully_shard``) train to the same weights as one
process with the same global batch, as the DDP test shows for DDP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import free_port, worker_env

WORKER = Path(__file__).with_name("fsdp_worker.py")


def _one(teacher_dir, out, batch) -> None:
    subprocess.run([sys.executable, str(WORKER), str(teacher_dir), str(out), str(batch)],
                   check=True, env=worker_env(), capture_output=True)  # fmt: skip


def test_fsdp2_two_processes_equal_one(tiny_teacher_dir, tmp_path):
    one, two, half = tmp_path / "one.safetensors", tmp_path / "two.safetensors", tmp_path / "half.safetensors"
    _one(tiny_teacher_dir, one, 4)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(WORKER), str(tiny_teacher_dir), str(two), "2"]  # fmt: skip
    out = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(Path(str(two) + ".json").read_text()) == {"world": 2, "sharded": True}
    a, b = load_file(one), load_file(two)
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)  # gathered whole
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5, msg=k)
    # negative control: one process with the per-process batch sees half the data and must differ,
    # so the equality above is two shards of one global batch, not two copies of the start
    _one(tiny_teacher_dir, half, 2)
    c = load_file(half)
    assert any(not torch.allclose(c[k], a[k], rtol=1e-4, atol=1e-5) for k in a)
