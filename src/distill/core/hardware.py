"""What this machine is and how to run on it: the device of each model and the precision, measured.

bf16 pays on GPUs and on CPUs with AMX (several times fp32's matmul rate), but on CPUs without
native bf16 matmul (AVX2-only AMD EPYC, most laptops) torch emulates it and runs ~25-75x *slower*
than fp32. So ``dtype: auto`` never assumes: on a CPU it times a bf16 and an fp32 matmul at the
model's own shapes (well under a second) and takes the faster, and the figures are cached per
machine class (CPU model, ISA flags, torch version, threads) and written into the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


_ISA_FLAGS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2", "fma")


# (rows, hidden) x (hidden, intermediate): 16 rows is a batch of decoding streams, 256 a training block
PROBE_ROWS = (16, 256)


_PROBE_SECONDS = 0.05  # per dtype and shape, after one warm-up call


@dataclass(frozen=True)
class Precision:
    """The dtype chosen for one purpose, and why."""

    dtype: str  # "float32" | "bfloat16"
    reason: str  # one line, printed at start
    device: str = "cpu"
    probe: dict = field(default_factory=dict)  # the measured figures, when a probe ran

    def as_dict(self) -> dict:
        return asdict(self)


def cpu_model() -> str:
    """The CPU's model name (``lscpu``'s "Model name"), or the platform's best guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The ISA flags that decide matmul speed (AMX, AVX-512 BF16, AVX-512, AVX2, FMA) this CPU has."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return [f for f in _ISA_FLAGS if f in flags]


def resolve_device(setting: str = "auto") -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU; otherwise the named device.

    Raises:
        ValueError: a CUDA device is named but this machine has none (or not that many).
    """
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(setting)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {setting!r}: this machine has no CUDA device; use cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {setting!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def _gflops(a: torch.Tensor, b: torch.Tensor, budget_s: float) -> float:
    """Matmul rate of ``a @ b`` in GFLOP/s, timed for about ``budget_s`` after one warm-up call."""
    t0 = time.perf_counter()
    a @ b
    first = time.perf_counter() - t0
    n, elapsed = 0, 0.0
    if first < budget_s:  # a dtype this slow has already lost; do not spend more on it
        t0 = time.perf_counter()
        while elapsed < budget_s:
            a @ b
            n += 1
            elapsed = time.perf_counter() - t0
    secs = elapsed / n if n else first
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / secs / 1e9


def probe_cpu_matmul(hidden: int, intermediate: int) -> dict:
    """fp32 and bf16 matmul GFLOP/s on this CPU at ``(rows, hidden) @ (hidden, intermediate)`` for
    each of ``PROBE_ROWS``, and the ratio of their total times (bf16 / fp32; < 1: bf16 is faster)."""
    gen = torch.Generator().manual_seed(0)
    rates: dict[str, dict[str, float]] = {"float32": {}, "bfloat16": {}}
    t_total = {"float32": 0.0, "bfloat16": 0.0}
    for rows in PROBE_ROWS:
        a = torch.randn(rows, hidden, generator=gen)
        b = torch.randn(hidden, intermediate, generator=gen)
        for name, dtype in DTYPES.items():
            rate = _gflops(a.to(dtype), b.to(dtype), _PROBE_SECONDS)
            rates[name][str(rows)] = round(rate, 2)
            t_total[name] += 2 * rows * hidden * intermediate / (rate * 1e9)
    return {
        "shape": f"(rows, {hidden}) @ ({hidden}, {intermediate}), rows in {list(PROBE_ROWS)}",
        "gflops": rates,
        "bf16_over_fp32_time": round(t_total["bfloat16"] / t_total["float32"], 3),
    }


def _probe_cache_path(hidden: int, intermediate: int) -> Path:
    from distill.core.models import cache_root

    # the ISA caps of oneDNN / MKL change which kernels run, so they are part of the machine class
    isa_caps = [os.environ.get(k, "") for k in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")]
    key = json.dumps([cpu_model(), cpu_flags(), torch.__version__, torch.get_num_threads(), hidden,
                      intermediate, isa_caps])  # fmt: skip
    return cache_root() / "probes" / f"precision-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


_DECIDED: dict[Path, Precision] = {}  # this process's decisions, by probe-cache path


def cpu_precision(hidden: int, intermediate: int) -> Precision:
    """bf16 or fp32 on this CPU, whichever ran the model's matmuls faster (measured once per machine
    class and shape, then read from the probe cache; decided once per process)."""
    path = _probe_cache_path(hidden, intermediate)
    if path in _DECIDED:
        return _DECIDED[path]
    probe, cached = None, False
    if path.is_file():
        try:
            probe, cached = json.loads(path.read_text()), True
        except (OSError, json.JSONDecodeError):
            probe = None
    if probe is None:
        probe = probe_cpu_matmul(hidden, intermediate)
        probe.update(cpu=cpu_model(), flags=cpu_flags(), torch=torch.__version__,
                     threads=torch.get_num_threads())  # fmt: skip
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(probe, indent=1))
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache only costs the probe next time
    ratio = probe["bf16_over_fp32_time"]
    dtype = "bfloat16" if ratio < 0.9 else "float32"  # bf16 must clearly win: it also costs accuracy
    g = probe["gflops"]
    big = str(PROBE_ROWS[-1])
    reason = (
        f"{dtype} on {probe['cpu']}: bf16 matmul {g['bfloat16'][big]:.1f} vs fp32 {g['float32'][big]:.1f} "
        f"GFLOP/s at {big} x {hidden} x {intermediate} (bf16/fp32 time {ratio:.2f}"
        f"{', cached probe' if cached else ''})"
    )
    _DECIDED[path] = Precision(dtype, reason, "cpu", probe)
    return _DECIDED[path]


def choose_precision(setting: str, device: torch.device, hidden: int, intermediate: int) -> Precision:
    """The dtype for ``setting`` (``auto``, ``float32`` or ``bfloat16``) on ``device``.

    An explicit dtype wins. ``auto`` on CUDA: bf16 where the device supports it, else fp32; on a
    CPU: the faster of the two in a matmul probe at the model's shapes (``cpu_precision``).
    """
    if setting != "auto":
        return Precision(setting, f"{setting} (set in the config)", device.type)
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name(device)
        dtype = "bfloat16" if ok else "float32"
        return Precision(dtype, f"{dtype} on {name} (bf16 {'supported' if ok else 'not supported'})", "cuda")
    if device.type != "cpu":
        return Precision("float32", f"float32 on {device.type} (no probe for this device)", device.type)
    return cpu_precision(hidden, intermediate)
