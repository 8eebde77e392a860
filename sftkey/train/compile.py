"""Opt-in torch.compile of the training forward (`train.compile`) and the timing of its warm-up.

    regional  each decoder layer compiled on its own: the layers share one code object and graph, so the warm-up
              is that of one layer; the sparse output layer and the loss stay eager.
    model     the whole LossModel forward (the decoder, the output layer on weighted positions, the loss). The
              boolean selection of weighted positions and the packed-mask detection break the graph, and the
              `all_roles` flag is a second variant; longer warm-up than regional.

Both compile with dynamic shapes: packed micro-batches change width (and rows) every step, and a static compile
would recompile for each new shape. `nn.Module.compile` compiles in place, so parameter names, checkpoints and
accelerate's unwrapping are those of the eager model.
"""

from __future__ import annotations

import statistics
from typing import Any

from sftkey.config_file import ConfigError

BACKEND = "inductor"  # the default-run tests stand in dynamo's "eager": the same capture and guards, no code generation
TYPICAL_STEPS = 3  # later steps whose median is subtracted from the first step's time


def compile_loss_model(loss_model: Any, mode: str) -> int:
    """Compile `loss_model` (a LossModel, possibly wrapped by accelerate/DDP) in place; returns the modules compiled."""
    if mode == "none":
        return 0
    if mode == "model":
        loss_model.compile(backend=BACKEND, dynamic=True)
        return 1
    inner = getattr(loss_model, "module", loss_model)  # DDP keeps the LossModel as .module
    lm = inner.causal_lm()
    layer_classes = set(getattr(lm, "_no_split_modules", None) or ())
    layers = [m for m in lm.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ConfigError(f"train.compile regional: {type(lm).__name__} names no decoder layer class "
                          "(_no_split_modules); use train.compile: model or none")
    for layer in layers:
        layer.compile(backend=BACKEND, dynamic=True)
    return len(layers)


class WarmupClock:
    """The compile warm-up of a stage: the first step's wall time minus the median of the next TYPICAL_STEPS (or the
    first step's time alone when the stage has no later step). Known once, after at most TYPICAL_STEPS + 1 steps."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.steps: list[float] = []
        self.seconds: float | None = None

    def add(self, seconds: float, last: bool) -> float | None:
        """Record one optimizer step's wall time; returns the warm-up at the step it becomes known, else None."""
        if not self.enabled or self.seconds is not None:
            return None
        self.steps.append(seconds)
        if len(self.steps) <= TYPICAL_STEPS and not last:
            return None
        later = self.steps[1:]
        self.seconds = round(max(0.0, self.steps[0] - (statistics.median(later) if later else 0.0)), 3)
        return self.seconds

    def meta(self) -> dict[str, float]:
        """What a checkpoint's sftkey.json records: `compile_warmup_s` when the stage compiled and it is known."""
        return {"compile_warmup_s": self.seconds} if self.seconds is not None else {}


def recompile_counts() -> dict[str, int]:
    """Frames dynamo compiled and graphs it made in this process so far (torch._dynamo counters)."""
    from torch._dynamo.utils import counters

    return {"frames": counters["frames"]["ok"], "unique_graphs": counters["stats"]["unique_graphs"]}
