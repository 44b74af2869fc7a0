"""Terms of use of a run: the teacher's licence, what the student is to it, where the prompts came from.

Read as far as the files say (``distill.core.models.read_licence``, the prompts' ``license``
fields), printed when a run starts, and recorded as comment lines at the top of the run's
config.yaml (comments: the config's keys stay those of the schema), from which the report and the
model card read them again.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from distill.core.config import RunConfig
from distill.core.data import DataError, Prompt, read_prompts
from distill.core.models import read_licence

HEADER = "# Terms of use, as far as distill could read them (comments, not config keys):"

# what the student is to the teacher: shrunk from it, or a given model trained on its outputs
SHRUNK = (
    "a derivative of the teacher, made of its layers and trained on its outputs: it may fall under "
    "the teacher's licence and terms"
)
GIVEN = (
    "a derivative trained on the teacher's outputs: it may fall under the teacher's terms, besides "
    "its own model's licence"
)

EMBEDDED_SOURCES = "see distill/prompts/SOURCES.md"


@dataclass(frozen=True)
class Terms:
    """What a run's student owes to its teacher and its data, one line each."""

    teacher: str  # the teacher's licence and where it was read
    data: str  # the prompts' sources and licences, as far as known
    student_licence: str | None = None  # a given student model's own licence
    provider: str | None = None  # an API teacher: the provider's terms
    student: str = SHRUNK

    def rows(self) -> list[tuple[str, str]]:
        """(label, text) in the order they are shown."""
        rows = [("teacher licence", self.teacher)]
        if self.student_licence is not None:
            rows.append(("student model licence", self.student_licence))
        rows += [("student", self.student), ("data", self.data)]
        if self.provider is not None:
            rows.append(("provider terms", self.provider))
        return rows

    def comment(self) -> str:
        """The YAML comment block config.yaml starts with."""
        lines = [HEADER, *(f"#   {label}: {' '.join(text.split())}" for label, text in self.rows())]
        return "\n".join(lines) + "\n"


_LABELS = {
    "teacher licence": "teacher",
    "student model licence": "student_licence",
    "student": "student",
    "data": "data",
    "provider terms": "provider",
}


def read_terms(config_yaml: Path) -> Terms | None:
    """The terms recorded at the top of a run's config.yaml; None when it records none."""
    if not Path(config_yaml).is_file():
        return None
    lines = Path(config_yaml).read_text().splitlines()
    if not lines or lines[0] != HEADER:
        return None
    found: dict[str, str] = {}
    for line in lines[1:]:
        if not line.startswith("#   "):
            break
        label, _, text = line[4:].partition(": ")
        if label in _LABELS:
            found[_LABELS[label]] = text
    if "teacher" not in found or "data" not in found:
        return None
    return Terms(**found)


def provider_host(base_url: str) -> str:
    """The host an API teacher's base_url names (``api.openai.com``)."""
    return urlparse(base_url).hostname or base_url


def provider_line(base_url: str) -> str:
    host = provider_host(base_url)
    return (
        f"the teacher answers through {host}: providers' terms may forbid using a model's outputs to "
        f"train models that compete with it; check {host}'s terms (or the served model's licence) before "
        "you use or share this student"
    )


def data_line(path: str | None, prompts: list[Prompt]) -> str:
    """Where the prompts came from: their ``source`` and ``license`` fields, counted."""
    where = "the embedded prompt set" if path is None else str(path)
    counts = Counter(
        (str(p.meta.get("source", "")).split("/")[0], str(p.meta.get("license") or "")) for p in prompts
    )
    named = [(src, lic, n) for (src, lic), n in counts.most_common() if lic]
    if not named:
        return f"{where}: no licence recorded in the file; the prompts' terms are yours to check"
    parts = [f"{n} from {src or 'a source not named'} ({lic})" for src, lic, n in named]
    unnamed = sum(n for (_, lic), n in counts.items() if not lic)
    if unnamed:
        parts.append(f"{unnamed} with no licence recorded")
    tail = f"; {EMBEDDED_SOURCES}" if path is None else ""
    return f"{where}: " + ", ".join(parts) + tail


def terms_of(cfg: RunConfig) -> Terms:
    """The terms of the run ``cfg`` describes, read from its files (model headers and cards, the
    prompts); never raises: what no file states reads ``unknown``."""
    if cfg.teacher.kind == "openai":
        host = provider_host(cfg.teacher.api.base_url)
        teacher = f"{cfg.teacher.api.model} at {host}: the provider's terms or the served model's licence, "
        teacher += "which no file here states"
        if cfg.teacher.model:
            teacher += f"; local copy {cfg.teacher.model}: {read_licence(cfg.teacher.model)}"
        provider = provider_line(cfg.teacher.api.base_url)
    else:
        teacher, provider = str(read_licence(cfg.teacher.model or "")), None
    given = cfg.student.init == "model" and bool(cfg.student.model)
    student_licence = str(read_licence(cfg.student.model)) if given else None
    try:
        prompts = read_prompts(cfg.data.path, cfg.data.format)[: cfg.data.max_prompts or None]
        data = data_line(cfg.data.path, prompts)
    except (DataError, OSError) as exc:
        data = f"{cfg.data.path}: could not be read ({exc})"
    if cfg.heal.data == "default":
        data += "; healing text: the bundled general text (chatterbot-corpus, BSD-3-Clause)"
    elif cfg.heal.data:
        data += f"; healing text {cfg.heal.data}: licence not recorded, yours to check"
    return Terms(teacher=teacher, data=data, student_licence=student_licence, provider=provider,
                 student=GIVEN if given else SHRUNK)  # fmt: skip
