"""distill: knowledge distillation of language models, from teacher signal to exported student."""

__version__ = "0.1.0"
