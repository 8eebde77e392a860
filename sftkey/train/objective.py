"""The model and its training loss in one module, so data parallelism (DDP, FSDP) wraps a single forward.

The output layer runs only on positions with a non-zero weight (`sparse_logits`): the key stage weighs a few
percent of the tokens, and the output layer of a small model is a large share of its compute. Losses per role
(thinking, answer, eos) are plain mean NLLs of the role's targets, reported for every role, also the ones the
stage does not train: those take an extra no-grad output-layer pass and are computed when asked (`all_roles`).

Some families change the output layer's result in their causal-LM forward (Granite divides the logits, Gemma-2
soft-caps them, Cohere multiplies them): `output_logits` applies the family's own step, and before the first
sparse step a probe of a few tokens checks that it reproduces the model's logits, so an unknown family is
refused instead of silently training on a different loss than it generates with.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from sftkey.loss import IGNORE_INDEX, loss_parts
from sftkey.roles import PROMPT, ROLE_NAMES
from sftkey.train.attention import varlen_kwargs

NO_GRAD_CHUNK = 2048  # rows of the no-grad output layer at a time: bounds the [rows, vocab] logits
PROBE_TOKENS = 8  # the first tokens of the first batch: the check of the sparse path costs two tiny forwards

# What each family's `*ForCausalLM.forward` (transformers 5.17) does between its decoder and its logits besides
# the output layer, and the config field it reads (multimodal wrappers read it from their text config).
HIDDEN_DIVIDED = {"minicpm3": "logits_scaling", "inkling_text": "logits_mup_width_multiplier"}  # before the layer
LOGITS_DIVIDED = {name: "logits_scaling" for name in (
    "granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared",
    "granite4_vision")}
LOGITS_MULTIPLIED = {"hyperclovax": "logits_scaling", "falcon_h1": "lm_head_multiplier", "cohere": "logit_scale",
                     "cohere2": "logit_scale", "cohere2_moe": "logit_scale", "cohere_compass_text": "logit_scale",
                     "cohere_compass": "logit_scale"}
LOGITS_SOFTCAPPED = {name: "final_logit_softcapping" for name in (  # cap * tanh(logits / cap)
    "gemma2", "gemma3_text", "gemma3n_text", "gemma3n", "gemma4_text", "gemma4", "gemma4_unified_text",
    "gemma4_unified", "vaultgemma", "nanochat")} | {"recurrent_gemma": "logits_soft_cap"}


class SparseLogitsError(ValueError):
    """The output layer on selected positions does not reproduce the model's own logits."""


class LossModel(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, sparse_logits: bool = True, varlen: bool = False):
        super().__init__()
        self.model = model  # a transformers causal LM, possibly wrapped by peft
        self.sparse_logits = sparse_logits
        self.varlen = varlen  # flash attention: one-row packed batches get their example boundaries once per forward
        self.checked = not sparse_logits  # the sparse path is checked on the first batch, on the model's device

    def causal_lm(self):
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def forward(self, input_ids, position_ids, labels, weights, targets, target_roles, dft: bool = False,
                all_roles: bool = True) -> dict[str, torch.Tensor]:
        """Returns {"total": summed weighted NLL (with grad), "role_nll": [roles] NLL sums, "role_count": [roles]}.

        All inputs are [rows, width]; packed rows restart their position ids per example and pass no attention
        mask, which transformers turns into attention within each example. `use_cache=False` matters: with a
        cache, transformers skips that packed-sequence detection and attention leaks across examples. Under flash
        attention (`varlen`) a packed micro-batch is one row and the example boundaries go to every layer as
        cumulative lengths (sftkey.train.attention.varlen_kwargs); no mask is built.
        """
        lm = self.causal_lm()
        trained = (labels != IGNORE_INDEX) & (weights != 0)  # [rows, width]
        # flash attention: cumulative example lengths instead of transformers finding the restarts in every layer
        varlen = varlen_kwargs(position_ids) if self.varlen and input_ids.shape[0] == 1 else {}
        if self.sparse_logits:  # hidden states [rows, width, H]; the output layer runs on selected rows only
            if not self.checked:
                check_sparse_logits(lm, input_ids[:1, :PROBE_TOKENS], position_ids[:1, :PROBE_TOKENS])
                self.checked = True
            outputs = lm.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                                       **varlen).last_hidden_state
            head = functools.partial(output_logits, lm)
        else:  # logits [rows, width, V] for every position
            outputs = lm(input_ids=input_ids, position_ids=position_ids, use_cache=False, **varlen).logits
            head = torch.nn.Identity()
        logits = head(outputs[trained])  # [N, V]
        parts = loss_parts(logits, labels[trained], weights[trained], dft=dft)

        role_nll = torch.zeros(len(ROLE_NAMES), device=input_ids.device)
        role_count = torch.zeros(len(ROLE_NAMES), device=input_ids.device)
        with torch.no_grad():
            nll = F.cross_entropy(logits.detach().float(), labels[trained], reduction="none")
            _add_by_role(role_nll, role_count, target_roles[trained], nll)
            if all_roles:
                others = (target_roles != PROMPT) & (targets != IGNORE_INDEX) & ~trained
                rows, other_targets, other_roles = outputs.detach()[others], targets[others], target_roles[others]
                for start in range(0, rows.shape[0], NO_GRAD_CHUNK):
                    chunk = slice(start, start + NO_GRAD_CHUNK)
                    chunk_nll = F.cross_entropy(head(rows[chunk]).float(), other_targets[chunk], reduction="none")
                    _add_by_role(role_nll, role_count, other_roles[chunk], chunk_nll)
        return {"total": parts.total, "role_nll": role_nll, "role_count": role_count}


def _add_by_role(sums: torch.Tensor, counts: torch.Tensor, roles: torch.Tensor, nll: torch.Tensor) -> None:
    sums.index_add_(0, roles, nll.to(sums.dtype))
    counts.index_add_(0, roles, torch.ones_like(nll, dtype=counts.dtype))


def output_logits(lm, hidden: torch.Tensor) -> torch.Tensor:
    """The causal LM's own logits [..., V] from its decoder's last hidden states [..., H]."""
    family, config = lm.config.model_type, lm.config.get_text_config()
    if family in HIDDEN_DIVIDED:
        hidden = hidden / getattr(config, HIDDEN_DIVIDED[family])
    logits = lm.get_output_embeddings()(hidden)
    if family in LOGITS_DIVIDED:
        logits = logits / getattr(config, LOGITS_DIVIDED[family])
    elif family in LOGITS_MULTIPLIED and getattr(config, LOGITS_MULTIPLIED[family]) is not None:
        logits = logits * getattr(config, LOGITS_MULTIPLIED[family])
    elif family in LOGITS_SOFTCAPPED and getattr(config, LOGITS_SOFTCAPPED[family]) is not None:
        cap = getattr(config, LOGITS_SOFTCAPPED[family])
        logits = torch.tanh(logits / cap) * cap
    if family == "inkling_text" and config.unpadded_vocab_size is not None:
        logits = logits[..., : config.unpadded_vocab_size]  # the padded vocabulary rows are never predicted
    return logits


@torch.compiler.disable  # runs once, eagerly, also inside a compiled forward (train.compile: model)
def check_sparse_logits(lm, input_ids: torch.Tensor, position_ids: torch.Tensor) -> None:
    """Refuse a model whose logits `output_logits` does not reproduce on a short probe [1, tokens], no grad.

    Both sides run in the ambient precision (bf16 autocast on a GPU), hence a looser tolerance there.
    """
    modes = {module: module.training for module in lm.modules()}
    lm.eval()  # dropout would make the two passes differ
    try:
        with torch.no_grad():
            own = lm(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
            hidden = lm.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
            sparse = output_logits(lm, hidden)
    finally:
        for module, training in modes.items():
            module.training = training
    if sparse.shape != own.shape:
        detail = f"shape {tuple(sparse.shape)}, not {tuple(own.shape)}"
    elif not torch.isfinite(own).all():
        return  # broken weights prove nothing here: the trainer's non-finite loss check names the step and batch
    else:
        fp32 = own.dtype == hidden.dtype == torch.float32 and not torch.is_autocast_enabled(input_ids.device.type)
        tolerance = (1e-4 if fp32 else 2e-2) * max(1.0, own.abs().max().item())
        difference = (sparse.float() - own.float()).abs().max().item()
        if difference <= tolerance:
            return
        detail = f"they differ by up to {difference:.3g}"
    raise SparseLogitsError(
        f"train.sparse_logits: the output layer on the decoder's hidden states does not reproduce the logits of "
        f"{type(lm).__name__} (model type {lm.config.model_type!r}) on a {input_ids.shape[1]}-token probe ({detail}): "
        "its forward transforms the logits in a way sftkey does not know, so the sparse path would train on a "
        "different loss than the model generates with. Set train.sparse_logits: false (the dense path uses the "
        "model's own logits)."
    )
