"""Export: the student as a Hugging Face folder, GGUF files and a model card, each checked.

Public names, by module:

    folder: export_student, check_export, model_card, check_rows, check_lines
    gguf: write_ggufs, check_gguf, GGUFExportError, EXPORTABLE
"""

from distill.export.folder import check_export, check_lines, check_rows, export_student, model_card
from distill.export.gguf import EXPORTABLE, GGUFExportError, check_gguf, write_ggufs

__all__ = [
    "EXPORTABLE",
    "GGUFExportError",
    "check_export",
    "check_gguf",
    "check_lines",
    "check_rows",
    "export_student",
    "model_card",
    "write_ggufs",
]
