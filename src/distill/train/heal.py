"""Healing: the shrunk student trains on general text before the task data (``heal``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from distill.core import fsio
from distill.core.config import RunConfig
from distill.core.data import Prompt
from distill.core.errors import StageError
from distill.core.progress import console
from distill.teacher.signal import LiveTeacher
from distill.train.loop import train


def heal(cfg: RunConfig, run: Path, held: list[Prompt], student, teacher: LiveTeacher | None, tok, acc,
         resume: bool) -> dict:  # fmt: skip
    """The healing stage (``cfg.heal``): the student trains on general text before the task data,
    distilled on every token from a live teacher (without one: language modelling alone). Its own
    checkpoints and metrics go to heal/; the healed weights to heal/healed.safetensors, so a rerun
    starts the task stage from them without healing again. Documents that contain a held-out prompt
    are left out."""
    from safetensors.torch import load_model, save_model

    from distill.core.data import general_text_examples, read_general_text

    out, h = run / "heal", cfg.heal
    done = out / "healed.safetensors"
    if resume and done.is_file():
        load_model(student, done)  # tied weights stored once
        return json.loads((out / "heal_summary.json").read_text())
    exclude = [m["content"] for p in held for m in p.messages if m["role"] == "user"]
    examples, report = general_text_examples(tok, read_general_text(h.data), cfg.train.max_seq_len, exclude)
    if not examples:
        raise StageError(
            f"heal.data {h.data}: no text left after leaving out the held-out prompts ({report})"
        )
    live = teacher is not None
    hcfg = cfg.train.model_copy(update={
        "max_steps": h.max_steps, "time_budget": h.time_budget, "lr": h.lr or cfg.train.lr,
        "onpolicy_fraction": 0.0, "prompt_weight": 0.0, "alpha": cfg.train.alpha if live else 0.0,
        "hidden_weight": cfg.train.hidden_weight if live else 0.0,
        "checkpoint_every": min(cfg.train.checkpoint_every, h.max_steps),
    })  # fmt: skip
    if acc.is_main_process:
        console.print(f"healing on general text {h.data}: {report['documents']} documents, "
                      f"{report['tokens']} tokens ({report['dropped_heldout']} left out: they hold a "
                      "held-out prompt)")  # fmt: skip
    summary = train(student, teacher, examples, hcfg, out, pad_id=tok.pad_token_id, vocab_size=len(tok),
                    resume=resume, accelerator=acc)  # fmt: skip
    summary |= {"data": h.data, **report, "signal": "live teacher" if live else "text only (no live teacher)"}
    if acc.is_main_process:
        tmp = out / "healed.safetensors.tmp"
        save_model(student, str(tmp))
        fsio.write_text(out / "heal_summary.json", json.dumps(summary, indent=1))
        os.replace(tmp, done)
    acc.wait_for_everyone()
    return summary
