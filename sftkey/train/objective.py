"""The model and its training loss in one module, so data parallelism (DDP, FSDP) wraps a single forward.

The output layer runs only on positions with a non-zero weight (`sparse_logits`): the key stage weighs a few
percent of the tokens, and the output layer of a small model is a large share of its compute. Losses per role
(thinking, answer, eos) are plain mean NLLs of the role's targets, reported for every role, also the ones the
stage does not train: those take an extra no-grad output-layer pass and are computed when asked (`all_roles`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sftkey.loss import IGNORE_INDEX, loss_parts
from sftkey.roles import PROMPT, ROLE_NAMES

NO_GRAD_CHUNK = 2048  # rows of the no-grad output layer at a time: bounds the [rows, vocab] logits


class LossModel(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, sparse_logits: bool = True):
        super().__init__()
        self.model = model  # a transformers causal LM, possibly wrapped by peft
        self.sparse_logits = sparse_logits

    def causal_lm(self):
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def forward(self, input_ids, position_ids, labels, weights, targets, target_roles, dft: bool = False,
                all_roles: bool = True) -> dict[str, torch.Tensor]:
        """Returns {"total": summed weighted NLL (with grad), "role_nll": [roles] NLL sums, "role_count": [roles]}.

        All inputs are [rows, width]; packed rows restart their position ids per example and pass no attention
        mask, which transformers turns into attention within each example. `use_cache=False` matters: with a
        cache, transformers skips that packed-sequence detection and attention leaks across examples.
        """
        lm = self.causal_lm()
        trained = (labels != IGNORE_INDEX) & (weights != 0)  # [rows, width]
        if self.sparse_logits:  # hidden states [rows, width, H]; the output layer runs on selected rows only
            outputs = lm.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
            head = lm.get_output_embeddings()
        else:  # logits [rows, width, V] for every position
            outputs = lm(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
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
