"""What the benchmark scripts share: the machine they ran on, its measured peaks, and one table of rows with each
row's ratio to the peers, printed from one run so that the ratios compare work done under the same load.

Pure helpers (flag parsing, ratio and utilisation arithmetic, the table) need no torch; the measurements import it.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field

SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # what decides fp32/bf16 matmul speed


@dataclass
class Row:
    """One line of a table: a rate (tokens/s) or the reason it did not run, and further cells already formatted."""

    name: str
    rate: float | None = None
    skipped: str = ""  # e.g. "skipped: pip install trl"
    cells: dict[str, str] = field(default_factory=dict)


def skipped_row(name: str, reason: str) -> Row:
    return Row(name, skipped=f"skipped: {reason}")


def cpu_summary(lscpu_text: str) -> str:
    """`lscpu` output -> "<model name>; avx2 avx512f ...; no amx_tile ..." (the flags of SPEED_FLAGS it has or lacks)."""
    fields = {}
    for line in lscpu_text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("Flags", "").split())
    has = [f for f in SPEED_FLAGS if f in flags]
    lacks = [f for f in SPEED_FLAGS if f not in flags]
    parts = [fields.get("Model name", "unknown CPU"), " ".join(has) or "none of " + " ".join(SPEED_FLAGS)]
    if has and lacks:
        parts.append("no " + " ".join(lacks))
    return "; ".join(parts)


def machine(device: str) -> str:
    """The GPU's name, or the CPU's model name and speed-relevant flags from `lscpu`."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name()
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        text = ""
    return cpu_summary(text)


def ratio(rate: float | None, reference: float | None) -> str:
    """"1.42x", or "n/a" when either side did not run."""
    if rate is None or not reference:
        return "n/a"
    return f"{rate / reference:.2f}x"


def mfu(n_params: int, tokens_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation of training: 6 x parameters per token (forward + backward), attention left out."""
    return 6 * n_params * tokens_per_s / peak_flops


def bandwidth_share(weight_bytes: int, steps_per_s: float, bytes_per_s: float) -> float:
    """Share of the measured memory rate that reading every weight once per decoding step takes."""
    return weight_bytes * steps_per_s / bytes_per_s


def table(rows: list[Row], references: dict[str, str], columns: list[str], unit: str = "tokens/s") -> str:
    """A markdown table: name, rate, `columns` (from each row's cells), then "vs <reference>" for each reference
    row name given (label -> row name). A skipped row prints its reason in the rate cell; a missing reference n/a."""
    rates = {row.name: row.rate for row in rows}
    head = ["row", unit, *columns, *(f"vs {label}" for label in references)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        rate = row.skipped if row.rate is None else f"{row.rate:,.1f}"
        cells = [row.cells.get(c, "") for c in columns]
        ratios = [ratio(row.rate, rates.get(name)) for name in references.values()]
        lines.append("| " + " | ".join([row.name, rate, *cells, *ratios]) + " |")
    return "\n".join(lines)


def _best_seconds(work, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):  # best of several: a shared machine is slowed by whatever else runs
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak(device: str, dtype) -> float:
    """FLOP/s of the best of five runs of square matrix products in `dtype` (what torch.mm reaches here)."""
    import torch

    n, reps = (8192, 20) if device.startswith("cuda") else (1024, 10)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)

    def work():
        for _ in range(reps):
            torch.mm(a, b)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return 2 * n**3 * reps / _best_seconds(work, 5)


def memcpy_rate(device: str, megabytes: int = 256) -> float:
    """Memory traffic of a large copy, bytes read + written per second (best of five): the rate decoding, which
    streams every weight once per step, is held against."""
    import torch

    src = torch.ones(megabytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)

    def work():
        dst.copy_(src)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return 2 * src.numel() * 4 / _best_seconds(work, 5)
