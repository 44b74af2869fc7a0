"""LoRA adapters on the student (PEFT): only the adapters train, merged back before export."""

from __future__ import annotations

from distill.core.config import LoraConfig
from distill.core.errors import StageError


def add_lora(student, lora: LoraConfig):
    """Wrap ``student`` with PEFT LoRA adapters; only the adapters train."""
    try:
        import peft
    except ImportError as exc:
        raise StageError("train.lora needs the peft package: pip install 'distill[lora]'") from exc
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=lora.target_modules, task_type="CAUSAL_LM")  # fmt: skip
    return peft.get_peft_model(student, config)
