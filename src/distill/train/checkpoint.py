"""Checkpoints: model, optimizer and every process's RNG state, saved atomically and resumed bit-exact;
the fingerprints of the inputs a training run started from."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import PreTrainedModel

from distill.core import fsio
from distill.core.errors import StageError, TrainingError
from distill.core.fsio import write_json


def _is_fsdp2(model: torch.nn.Module) -> bool:
    """Is ``model`` sharded by FSDP2's ``fully_shard`` (its parameters DTensors)?"""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_states(acc: Accelerator, model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The whole model's weights and the optimizer's state, gathered from every process's shard
    under FSDP2 (a collective: every process calls it); plain state dicts otherwise."""
    if not _is_fsdp2(model):
        return acc.get_state_dict(model), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=full), get_optimizer_state_dict(model, opt, options=full)


def save_checkpoint(
    ckpt_dir: Path,
    step: int,
    model_state: dict,
    opt_state: dict,
    keep: int,
    rng_states: list[dict] | None = None,
) -> Path:
    """Write ``ckpt_dir/step-XXXXXX`` atomically; keep only the last ``keep`` checkpoints.

    ``rng_states``: every process's ``_rng_states`` by rank (``gathered_rng_states``), each written
    as ``rng-{rank}.pt``; None: this one process's.
    """
    final = ckpt_dir / f"step-{step:06d}"
    tmp = ckpt_dir / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model_state.items()}
    # Tied weights share storage; safetensors wants one copy of each tensor.
    seen: dict[int, str] = {}
    for k in list(state):
        ptr = state[k].data_ptr()
        if ptr in seen:
            state[k] = state[k].clone()
        seen[ptr] = k
    try:  # each file fsynced as it is written
        fsio.save_safetensors(state, tmp / "model.safetensors")
        fsio.save_torch(opt_state, tmp / "optimizer.pt")
        for rank, states in enumerate(rng_states or [_rng_states()]):
            fsio.save_torch(states, tmp / f"rng-{rank}.pt")
        fsio.write_bytes(tmp / "trainer_state.json", json.dumps({"step": step}).encode())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written checkpoint does not stay behind
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(ckpt_dir.glob("step-*"))[:-keep]:
        shutil.rmtree(old)
    return final


def _rng_states() -> dict:
    """This process's random state of the CPU and, with CUDA, of every visible GPU (dropout and
    sampling on a GPU draw from those; each process has its own, and under DDP draws from its own
    device's): uint8 tensors, which a machine without a GPU loads as well."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return states


def gathered_rng_states(world: int) -> list[dict] | None:
    """Every process's ``_rng_states`` by rank, on rank 0 (None on the others): each process draws
    its own dropout and samples, so each resumes from its own state. A collective when world > 1."""
    if world == 1:
        return [_rng_states()]
    rank = torch.distributed.get_rank()
    gathered = [None] * world if rank == 0 else None
    torch.distributed.gather_object(_rng_states(), gathered, dst=0)
    return gathered


def _set_rng_states(states: dict) -> None:
    """Set back what ``_rng_states`` kept; the GPUs' states only where there are GPUs (as many as
    there are now)."""
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"][: torch.cuda.device_count()])


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = sorted(p for p in ckpt_dir.glob("step-*") if (p / "trainer_state.json").is_file())
    return found[-1] if found else None


def load_checkpoint(path: Path, student: PreTrainedModel, opt: torch.optim.Optimizer, rank: int = 0) -> int:
    """Restore weights, optimizer and process ``rank``'s RNG from ``path``; returns the step to
    continue from. An FSDP2-sharded student takes its shard of the full checkpoint on every process.

    RNG: ``rng-{rank}.pt``; a checkpoint of fewer processes (or of the older single ``rng.pt``)
    gives rank 0's state to the ranks it lacks.
    """
    state = load_file(path / "model.safetensors")
    opt_state = torch.load(path / "optimizer.pt", weights_only=True)
    if _is_fsdp2(student):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        full = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(student, state, options=full)
        set_optimizer_state_dict(student, opt, opt_state, options=full)
    else:
        missing, unexpected = student.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise TrainingError(f"{path}: checkpoint does not fit the student ({missing or unexpected})")
        opt.load_state_dict(opt_state)
    candidates = (path / f"rng-{rank}.pt", path / "rng.pt", path / "rng-0.pt")
    rng = next((p for p in candidates if p.is_file()), candidates[0])
    _set_rng_states(torch.load(rng, weights_only=True))
    return json.loads((path / "trainer_state.json").read_text())["step"]


def _keep_metrics_upto(path: Path, step: int) -> float:
    """Drop the records after ``step`` from ``metrics.jsonl`` (atomic rewrite), so each step is there
    once. Returns the training seconds the kept steps took (their last ``elapsed_s``; 0 if none)."""
    if not path.is_file():
        return 0.0
    lines = path.read_text().splitlines(keepends=True)
    kept = [ln for ln in lines if ln.strip() and ln.endswith("\n") and json.loads(ln)["step"] <= step]
    if len(kept) != len(lines):
        fsio.write_text(path, "".join(kept))
    return float(json.loads(kept[-1]).get("elapsed_s", 0.0)) if kept else 0.0


TRAIN_INPUTS = ("answers.jsonl", "student_init/model.safetensors", "teacher_cache/meta.json")


def check_train_inputs(run: Path, resume: bool, main: bool) -> None:
    """Refuse to resume training from checkpoints made with other inputs (answers regenerated, the
    student shrunk again, the cache rebuilt since): the run would mix the two. The fingerprints of
    the inputs are kept in train_inputs.json when training starts."""
    from distill.teacher.cache import file_sha256

    now = {name: file_sha256(run / name) for name in TRAIN_INPUTS if (run / name).is_file()}
    stamp = run / "train_inputs.json"
    if resume and stamp.is_file() and latest_checkpoint(run / "checkpoints") is not None:
        before = json.loads(stamp.read_text())
        changed = [name for name in sorted(set(before) | set(now)) if before.get(name) != now.get(name)]
        if changed:
            raise StageError(
                f"{', '.join(changed)} changed since training started (its checkpoints are in "
                f"{run / 'checkpoints'}); resuming would mix the two. Start over with `distill train "
                "--no-resume`, or put the earlier files back"
            )
        return
    if main:
        write_json(stamp, now)
