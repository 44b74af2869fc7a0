"""Writing files so that a full disk, a quota or a forbidden folder is an ``OSError`` that names the
file, whichever library serialises the data.

safetensors reports a failed write as ``SafetensorError('... (os error 28)')`` and ``torch.save`` as
``RuntimeError('unexpected pos ...')``, neither an ``OSError`` and neither naming the file. So weights
and optimizer state are serialised in memory and written here; :func:`write_fault` finds the
``OSError`` behind a library's error where only its message carries the errno (``save_pretrained``).
Reading JSON lines back: :func:`json_lines`.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
from pathlib import Path

import torch

# a full disk, a quota, a file-size limit, a read-only or forbidden folder: the user's to fix
WRITE_FAULTS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS}


_QUOTED_ERRNO = re.compile(r"\(os error (\d+)\)")


def json_lines(text: str) -> list[str]:
    """The lines of a JSON-lines text: split at ``\\n`` only. ``str.splitlines`` also splits at
    U+2028, U+2029 and U+0085, which ``json.dumps(..., ensure_ascii=False)`` writes raw inside a
    string (a teacher's answer held a U+2028), so it would cut one record in two."""
    return text.split("\n")


def write_bytes(path: Path, data: bytes | memoryview, *, name: Path | None = None) -> None:
    """Write ``data`` to ``path`` and fsync it; a failure is an ``OSError`` naming ``name`` (the
    file the user knows, when ``path`` is its temporary) or ``path``."""
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        exc.filename = str(name or path)
        raise


def write_text(path: Path, text: str | bytes) -> None:
    """Replace ``path`` with ``text`` (or bytes) atomically: readers see the old file or the new one,
    never half of it, and a failed write leaves the old file and no temporary behind."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write_bytes(tmp, text.encode() if isinstance(text, str) else text, name=path)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_safetensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None, *,
                     name: Path | None = None) -> str:  # fmt: skip
    """``safetensors`` ``save_file`` for torch or numpy tensors, with a failed write named; returns the
    SHA-256 of the bytes written (hex), taken from memory rather than by reading the file back."""
    first = next(iter(tensors.values()), None)
    if isinstance(first, torch.Tensor) or first is None:
        from safetensors.torch import save
    else:
        from safetensors.numpy import save
    data = save(tensors, metadata=metadata)
    write_bytes(path, data, name=name)
    return hashlib.sha256(data).hexdigest()


def save_torch(obj, path: Path) -> None:
    """``torch.save`` (for state that is not weights: optimizer moments, RNG), with a failed write named."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getbuffer())


def write_fault(exc: BaseException) -> OSError | None:
    """The write fault behind ``exc`` (see ``WRITE_FAULTS``), or None when it is not one."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:  # the error itself, then what caused it
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in WRITE_FAULTS:
            return exc
        m = _QUOTED_ERRNO.search(str(exc))
        if m and int(m.group(1)) in WRITE_FAULTS:
            code = int(m.group(1))
            return OSError(code, os.strerror(code))
        exc = exc.__cause__ or exc.__context__
    return None


def save_pretrained(model, tok, folder: Path) -> None:
    """``model.save_pretrained`` (safetensors) and ``tok.save_pretrained``; a write fault is an
    ``OSError`` naming the file, or the folder where the library's error does not say which file."""
    try:
        model.save_pretrained(folder, safe_serialization=True)
        if tok is not None:
            tok.save_pretrained(folder)
    except Exception as exc:
        fault = write_fault(exc)
        if fault is None:
            raise
        raise OSError(fault.errno, fault.strerror, fault.filename or str(folder)) from exc


def write_json(path: Path, obj) -> None:
    """Write JSON to a temporary file and rename it over ``path``: readers see the old or the new."""
    write_text(path, json.dumps(obj, indent=1))
