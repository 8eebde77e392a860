"""`precision: auto`: bf16 autocast where it is faster, fp32 elsewhere, decided by measuring, once per machine.

On a GPU with bf16, autocast is always the faster choice. On a CPU it depends on the chip: with AMX or AVX512-BF16
a bf16 matrix product runs several times faster than fp32; without them (AVX2 only) torch emulates bf16 and it runs
tens of times slower. So `auto` on a CPU times one model-shaped matrix product both ways and picks bf16 only when it
is clearly faster. The result is kept in `$SFTKEY_HOME/probes/` per CPU model, flags, torch version and thread count,
so every run on one machine makes the same choice and the probe costs its ~0.1-0.5 s once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from sftkey.atomic import write_text
from sftkey.paths import sftkey_home

BF16_MIN_SPEEDUP = 1.25  # below this the matmul gain does not pay for the casts autocast adds around it
PROBE_SHAPE = (128, 576, 1152)  # rows x hidden x MLP width of a 135M model's matrix product (SmolLM2: 576 / 1536)
PROBE_VERSION = 1  # bump when the measurement changes, so cached results are measured again
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


@dataclass(frozen=True)
class CpuPrecisionProbe:
    """One machine's fp32 and bf16-autocast matrix-product rates (GFLOP/s) at PROBE_SHAPE."""

    fp32_gflops: float
    bf16_gflops: float
    cpu: str  # the CPU's model name
    flags: tuple[str, ...]  # which of SPEED_FLAGS it reports
    threads: int  # torch's intra-op threads during the probe
    torch: str

    @property
    def bf16_speedup(self) -> float:
        return self.bf16_gflops / self.fp32_gflops

    @property
    def prefers_bf16(self) -> bool:
        return self.bf16_speedup >= BF16_MIN_SPEEDUP

    def describe(self) -> str:
        native = "/".join(f for f in self.flags if "bf16" in f or "amx" in f) or "no native bf16 (flags: " + (
            ", ".join(self.flags) or "none") + ")"
        return (f"CPU {self.cpu}, {native}: bf16 matmul {self.bf16_gflops:.1f} GFLOP/s vs fp32 "
                f"{self.fp32_gflops:.1f} ({self.bf16_speedup:.2f}x) on {self.threads} thread(s)")


def cpu_identity() -> tuple[str, tuple[str, ...]]:
    """(model name, SPEED_FLAGS present) from /proc/cpuinfo; platform.processor() elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor() or platform.machine(), ()
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model or platform.machine(), tuple(f for f in SPEED_FLAGS if f in flags)


def measure_cpu(repeats: int = 3) -> CpuPrecisionProbe:
    """Time PROBE_SHAPE's product in fp32 and under bf16 autocast (fp32 inputs, as training runs it); best of
    `repeats` after one warm-up each."""
    import torch

    rows, hidden, width = PROBE_SHAPE
    generator = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, hidden, generator=generator), torch.randn(hidden, width, generator=generator)

    def best_seconds(bf16: bool) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            torch.mm(x, w)
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                torch.mm(x, w)
                best = min(best, time.perf_counter() - start)
        return max(best, 1e-9)

    flops = 2 * rows * hidden * width / 1e9
    cpu, flags = cpu_identity()
    return CpuPrecisionProbe(round(flops / best_seconds(False), 2), round(flops / best_seconds(True), 2), cpu, flags,
                             torch.get_num_threads(), torch.__version__)


def probe_path(home: Path | None = None) -> Path:
    import torch

    cpu, flags = cpu_identity()
    key = json.dumps([PROBE_VERSION, cpu, flags, torch.__version__, torch.get_num_threads()])
    return (home or sftkey_home()) / "probes" / f"cpu-precision-{hashlib.sha1(key.encode()).hexdigest()[:12]}.json"


def cpu_probe(home: Path | None = None) -> CpuPrecisionProbe:
    """This machine's probe: read from the cache, or measured and cached (atomically) when missing or unreadable.
    A lock makes processes that start together (data-parallel ranks, parallel cells) share one measurement, so they
    cannot choose differently."""
    from filelock import FileLock

    path = probe_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.with_suffix(".lock"))):
        probe = _read_probe(path)
        if probe is None:
            probe = measure_cpu()
            write_text(path, json.dumps(dataclasses.asdict(probe), indent=1) + "\n")
    return probe


def _read_probe(path: Path) -> CpuPrecisionProbe | None:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        probe = CpuPrecisionProbe(**{**raw, "flags": tuple(raw["flags"])})
    except (OSError, ValueError, TypeError, KeyError):
        return None  # missing, cut or from another version: measure again
    return probe if probe.fp32_gflops > 0 and probe.bf16_gflops > 0 else None


def resolve_precision(setting: str, cuda: bool, cuda_bf16: bool = False,
                      probe: CpuPrecisionProbe | None = None) -> tuple[str, str]:
    """("bf16" | "fp32", why) for train.precision `setting` on this device. `probe` stands in for this CPU's cached
    probe (tests); it is only consulted for `auto` on a CPU."""
    if setting != "auto":
        return setting, f"train.precision {setting}"
    if cuda:
        return ("bf16", "auto: the GPU supports bf16") if cuda_bf16 else ("fp32", "auto: the GPU has no bf16")
    probe = probe or cpu_probe()
    choice = "bf16" if probe.prefers_bf16 else "fp32"
    verdict = "faster" if choice == "bf16" else f"not {BF16_MIN_SPEEDUP}x faster"
    return choice, f"auto: bf16 autocast is {verdict} here ({probe.describe()})"
