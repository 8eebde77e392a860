"""Per-token loss weights for each arm, and the one function that turns them into a loss.

An arm's loss is data: a mapping from token role to weight (and whether DFT scaling applies). Weights are
folded into a per-token weight vector once, at data preparation; the loss never re-derives masks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

from sftkey.roles import ROLE_IDS, ROLE_NAMES

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100  # label of a position that carries no loss


@dataclass(frozen=True)
class LossSpec:
    """How one training stage weighs each token role.

    weights: role name -> weight; roles not named weigh 0. `prompt` must stay 0.
    dft: scale each token's loss by the detached probability of its target (DFT, arXiv 2508.05629).
    """

    weights: dict[str, float] = field(default_factory=dict)
    dft: bool = False

    def __post_init__(self):
        for role, weight in self.weights.items():
            if role not in ROLE_IDS:
                raise ValueError(f"unknown token role {role!r} in loss weights; roles are {list(ROLE_NAMES)}")
            if not (weight >= 0 and weight != float("inf")):
                raise ValueError(f"loss weight for role {role!r} must be finite and >= 0, got {weight}")
        if self.weights.get("prompt", 0.0) != 0.0:
            raise ValueError("the prompt role must have weight 0: the model is not trained to write the question")
        if not any(w > 0 for w in self.weights.values()):
            raise ValueError(f"loss weights {self.weights} select no token: give some role a weight > 0")

    def role_weights(self) -> list[float]:
        """Weight per role id (index = role id)."""
        return [float(self.weights.get(name, 0.0)) for name in ROLE_NAMES]

    def token_weights(self, roles: Sequence[int]) -> list[float]:
        table = self.role_weights()
        return [table[r] for r in roles]


def sft() -> LossSpec:
    """All response tokens (stage 1, SFT and SFT-Tag)."""
    return LossSpec({"thinking": 1.0, "answer": 1.0, "eos": 1.0})


def key() -> LossSpec:
    """The answer span and the turn end only (stage 2, Key-Tag): the reasoning stays as input."""
    return LossSpec({"answer": 1.0, "eos": 1.0})


def weighted(w_thinking: float = 1.0, w_answer: float = 5.0) -> LossSpec:
    """Single-stage weighted loss (a reviewers' control); the turn end weighs like the answer."""
    return LossSpec({"thinking": w_thinking, "answer": w_answer, "eos": w_answer})


def dft() -> LossSpec:
    """All response tokens, each scaled by the detached probability of its target."""
    return LossSpec({"thinking": 1.0, "answer": 1.0, "eos": 1.0}, dft=True)


PRESETS = {"sft": sft, "key": key, "weighted": weighted, "dft": dft}


def loss_spec(name: str, **kwargs) -> LossSpec:
    """A preset by name (`sft`, `key`, `weighted`, `dft`), or `custom` with explicit `weights`."""
    if name == "custom":
        return LossSpec(**kwargs)
    if name not in PRESETS:
        raise ValueError(f"unknown loss {name!r}: choose one of {sorted(PRESETS) + ['custom']}")
    return PRESETS[name](**kwargs)


def shifted_targets(input_ids: Sequence[int], weights: Sequence[float]) -> tuple[list[int], list[float]]:
    """Next-token targets for a causal LM: position t predicts token t+1 with token t+1's weight.

    Zero-weight targets get IGNORE_INDEX; the last position predicts nothing.
    """
    labels = [tok if w > 0 else IGNORE_INDEX for tok, w in zip(input_ids[1:], weights[1:])]
    return labels + [IGNORE_INDEX], list(weights[1:]) + [0.0]


@dataclass
class LossParts:
    """A batch's loss before normalisation, so that accumulation and data parallelism can sum the parts."""

    total: "torch.Tensor"  # sum over tokens of weight * nll (DFT: * detached p)
    weight_sum: "torch.Tensor"  # sum of weights of the targets that carry loss
    token_count: "torch.Tensor"  # number of targets that carry loss


def loss_parts(
    outputs: "torch.Tensor",
    labels: "torch.Tensor",
    weights: "torch.Tensor",
    output_layer: "torch.nn.Module | None" = None,
    dft: bool = False,
) -> LossParts:
    """Summed weighted next-token NLL.

    outputs: logits [..., V], or hidden states [..., H] when `output_layer` is given; then the output layer
      runs only on positions with a non-zero weight (the key stage weighs a few percent of the tokens).
    labels: [...] already shifted target ids, IGNORE_INDEX where nothing is predicted.
    weights: [...] float weight of each target.
    """
    import torch
    import torch.nn.functional as F

    keep = (labels != IGNORE_INDEX) & (weights != 0)
    flat = outputs[keep]  # [N, V] or [N, H]
    if output_layer is not None:
        flat = output_layer(flat)
    flat = flat.to(torch.promote_types(flat.dtype, torch.float32))  # bf16 logits: the loss in fp32
    targets, w = labels[keep], weights[keep].to(flat.dtype)
    nll = F.cross_entropy(flat, targets, reduction="none")  # [N]
    if dft:
        nll = nll * torch.exp(-nll).detach()  # p(target), no gradient through the scale
    return LossParts(total=(nll * w).sum(), weight_sum=w.sum(), token_count=keep.sum().to(flat.dtype))


NORMALIZERS = ("weights", "tokens")


def normalize(parts: LossParts, normalizer: str = "weights") -> "torch.Tensor":
    """Divide the summed loss by the sum of weights (default) or by the number of weighted tokens.

    The paper does not say whether stage 2 sums or averages; we average, and record the choice in the config.
    A batch with nothing to predict has total 0 and gives 0 rather than NaN.
    """
    if normalizer not in NORMALIZERS:
        raise ValueError(f"unknown normalizer {normalizer!r}: choose one of {NORMALIZERS}")
    denominator = parts.weight_sum if normalizer == "weights" else parts.token_count
    return parts.total / denominator.clamp(min=1e-8)


def weighted_loss(outputs, labels, weights, output_layer=None, dft: bool = False, normalizer: str = "weights"):
    """`loss_parts` normalised: the mean weighted NLL of one batch."""
    return normalize(loss_parts(outputs, labels, weights, output_layer, dft), normalizer)
