import math

import pytest
import torch

from sftkey.loss import IGNORE_INDEX, LossSpec, loss_parts, loss_spec, normalize, shifted_targets, weighted_loss
from sftkey.roles import ANSWER, EOS, PROMPT, THINKING

ROLES = [PROMPT, PROMPT, THINKING, THINKING, THINKING, ANSWER, ANSWER, EOS]


def test_presets_map_roles_to_weights():
    assert loss_spec("sft").token_weights(ROLES) == [0, 0, 1, 1, 1, 1, 1, 1]
    assert loss_spec("key").token_weights(ROLES) == [0, 0, 0, 0, 0, 1, 1, 1]
    assert loss_spec("weighted", w_thinking=1.0, w_answer=5.0).token_weights(ROLES) == [0, 0, 1, 1, 1, 5, 5, 5]
    assert loss_spec("dft").dft and loss_spec("dft").token_weights(ROLES) == [0, 0, 1, 1, 1, 1, 1, 1]
    assert loss_spec("custom", weights={"answer": 2.0}).role_weights() == [0.0, 0.0, 2.0, 0.0]


@pytest.mark.parametrize(
    "weights,message",
    [
        ({"reasoning": 1.0}, "unknown token role 'reasoning'"),
        ({"answer": -1.0}, "must be finite and >= 0"),
        ({"answer": float("nan")}, "must be finite and >= 0"),
        ({"prompt": 1.0, "answer": 1.0}, "prompt role must have weight 0"),
        ({"thinking": 0.0}, "select no token"),
    ],
)
def test_bad_weights_are_refused(weights, message):
    with pytest.raises(ValueError, match=message):
        LossSpec(weights)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown loss 'keys'"):
        loss_spec("keys")


def test_shifted_targets():
    ids = [10, 11, 12, 13, 14, 15, 16, 2]
    labels, weights = shifted_targets(ids, loss_spec("key").token_weights(ROLES))
    assert labels == [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 15, 16, 2, IGNORE_INDEX]
    assert weights == [0, 0, 0, 0, 1, 1, 1, 0.0]


def small_batch():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 5, dtype=torch.float64)
    labels = torch.tensor([[IGNORE_INDEX, 3, 1, 4]])
    weights = torch.tensor([[0.0, 1.0, 5.0, 0.0]], dtype=torch.float64)
    return logits, labels, weights


def test_weighted_loss_matches_a_hand_computation():
    logits, labels, weights = small_batch()
    logp = torch.log_softmax(logits[0], -1)
    nll1, nll2 = -logp[1, 3].item(), -logp[2, 1].item()
    parts = loss_parts(logits, labels, weights)
    assert parts.total.item() == pytest.approx(nll1 + 5 * nll2, rel=1e-12)
    assert (parts.weight_sum.item(), parts.token_count.item()) == (6.0, 2.0)  # label 4 at weight 0 is skipped
    assert normalize(parts, "weights").item() == pytest.approx((nll1 + 5 * nll2) / 6, rel=1e-12)
    assert normalize(parts, "tokens").item() == pytest.approx((nll1 + 5 * nll2) / 2, rel=1e-12)
    dft = loss_parts(logits, labels, weights, dft=True)
    assert dft.total.item() == pytest.approx(nll1 * math.exp(-nll1) + 5 * nll2 * math.exp(-nll2), rel=1e-12)


def test_gradient_is_zero_exactly_where_the_weight_is_zero():
    logits, labels, weights = small_batch()
    logits.requires_grad_(True)
    weighted_loss(logits, labels, weights).backward()
    assert logits.grad[0, 0].abs().sum().item() == 0.0
    assert logits.grad[0, 3].abs().sum().item() == 0.0
    assert logits.grad[0, 1].abs().sum().item() > 0 and logits.grad[0, 2].abs().sum().item() > 0


def test_dft_scale_carries_no_gradient():
    """DFT's gradient is p * grad(nll): the detached scale is a constant, not differentiated."""
    logits, labels, weights = small_batch()
    logits.requires_grad_(True)
    loss_parts(logits, labels, weights, dft=True).total.backward()
    logp = torch.log_softmax(logits.detach()[0, 1], -1)
    p = logp[3].exp().item()
    expected = p * (logp.exp() - torch.nn.functional.one_hot(torch.tensor(3), 5))  # p * d(nll)/d(logits)
    assert torch.allclose(logits.grad[0, 1], expected, atol=1e-12)


def test_output_layer_runs_only_on_weighted_positions_and_gives_the_same_loss():
    torch.manual_seed(0)
    head = torch.nn.Linear(3, 5, bias=False).double()
    hidden = torch.randn(1, 4, 3, dtype=torch.float64)
    _, labels, weights = small_batch()
    seen = []
    head.register_forward_hook(lambda module, inputs, out: seen.append(inputs[0].shape[:-1]))
    from_hidden = weighted_loss(hidden, labels, weights, output_layer=head)
    from_logits = weighted_loss(head(hidden), labels, weights)
    assert seen == [(2,), (1, 4)]  # 2 weighted rows, then all 4 positions for the reference
    assert from_hidden.item() == pytest.approx(from_logits.item(), rel=1e-12)


def test_nothing_to_predict_gives_zero_not_nan():
    logits = torch.randn(1, 3, 5, requires_grad=True)
    labels = torch.full((1, 3), IGNORE_INDEX)
    loss = weighted_loss(logits, labels, torch.zeros(1, 3))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad.abs().sum().item() == 0.0
