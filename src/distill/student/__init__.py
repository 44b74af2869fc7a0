"""The student: shrunk from the teacher (layers, heads, channels kept by importance), or given; LoRA.

Public names, by module:

    build: choose_student, build_student
    importance: block_importance, width_importance, most_important_layers
    prune: shrink_layers, prune_width, evenly_spaced_layers, layer_map, HIDDEN_PRUNABLE
    lora: add_lora
"""

from distill.student.build import build_student, choose_student
from distill.student.importance import block_importance, most_important_layers, width_importance
from distill.student.lora import add_lora
from distill.student.prune import HIDDEN_PRUNABLE, evenly_spaced_layers, layer_map, prune_width, shrink_layers

__all__ = [
    "HIDDEN_PRUNABLE",
    "add_lora",
    "block_importance",
    "build_student",
    "choose_student",
    "evenly_spaced_layers",
    "layer_map",
    "most_important_layers",
    "prune_width",
    "shrink_layers",
    "width_importance",
]
