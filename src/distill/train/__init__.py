"""Training: the one loop, its step (loss of a micro-batch), checkpoints, on-policy samples, healing.

Public names, by module:

    loop: train, micro_batches, TimePlan, lr_at
    step: distill_loss, kd_ce_loss, loss_options, attach_hidden_projection, detach_hidden_projection
    checkpoint: save_checkpoint, load_checkpoint, latest_checkpoint, check_train_inputs
    onpolicy: sample_answers, mix, plain_sampling
    heal: heal
"""

from distill.train.checkpoint import check_train_inputs, latest_checkpoint, load_checkpoint, save_checkpoint
from distill.train.heal import heal
from distill.train.loop import TimePlan, lr_at, micro_batches, train
from distill.train.onpolicy import mix, plain_sampling, sample_answers
from distill.train.step import (
    attach_hidden_projection,
    detach_hidden_projection,
    distill_loss,
    kd_ce_loss,
    loss_options,
)

__all__ = [
    "TimePlan",
    "attach_hidden_projection",
    "check_train_inputs",
    "detach_hidden_projection",
    "distill_loss",
    "heal",
    "kd_ce_loss",
    "latest_checkpoint",
    "load_checkpoint",
    "loss_options",
    "lr_at",
    "micro_batches",
    "mix",
    "plain_sampling",
    "sample_answers",
    "save_checkpoint",
    "train",
]
