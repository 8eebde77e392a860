"""The training loss on the tiny model: zero gradient where the weight is zero, packed == unpacked."""

import pytest
import torch

from sftkey.loss import loss_spec
from sftkey.roles import ROLE_NAMES
from sftkey.train.batching import micro_batch, stage_samples
from sftkey.train.objective import LossModel

ARMS = {  # arm -> (format, loss preset, preset arguments)
    "sft": ("plain", "sft", {}),
    "sft_tag": ("tagged", "sft", {}),
    "key_tag": ("tagged", "key", {}),
    "weighted_tag": ("tagged", "weighted", {"w_thinking": 1.0, "w_answer": 5.0}),
    "dft_tag": ("tagged", "dft", {}),
}


@pytest.fixture(scope="module")
def prepared(tiny_tokenizer, arith):
    from sftkey.data import DataConfig
    from sftkey.prepare import PrepareConfig, prepare

    data = DataConfig("gsm8k", path=str(arith))
    return {fmt: prepare(PrepareConfig(data, tagged=fmt == "tagged", max_length=256), tiny_tokenizer)
            for fmt in ("tagged", "plain")}


def load(folder):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)


@pytest.mark.parametrize("arm", list(ARMS))
def test_logit_gradient_is_exactly_zero_where_the_weight_is_zero(arm, prepared, tiny_model_dir):
    fmt, preset, args = ARMS[arm]
    spec = loss_spec(preset, **args)
    samples, _ = stage_samples(prepared[fmt].examples[:5], spec)
    batch = micro_batch(samples, range(5), pad_id=0, packing=True, pack_length=512)
    inputs = batch.tensors
    assert inputs["input_ids"].shape[0] == 2 and batch.slots > batch.tokens  # several examples per row, and padding
    model = load(tiny_model_dir)
    captured = {}

    def keep_logits(module, args, output):
        output.retain_grad()
        captured["logits"] = output

    model.get_output_embeddings().register_forward_hook(keep_logits)
    full = LossModel(model, sparse_logits=False)(**inputs, dft=spec.dft)
    full["total"].backward()
    grad = captured["logits"].grad  # [rows, width, vocab]
    weighted = inputs["weights"] != 0
    assert torch.count_nonzero(grad[~weighted]) == 0
    assert bool((grad[weighted].abs().sum(-1) > 0).all())
    # exactly the tokens of the roles the arm weighs (each predicted from the position before it)
    table = spec.role_weights()
    assert int(weighted.sum()) == sum(table[r] > 0 for ex in prepared[fmt].examples[:5] for r in ex.roles)
    sparse = LossModel(load(tiny_model_dir), sparse_logits=True)(**inputs, dft=spec.dft)
    assert torch.allclose(sparse["total"], full["total"], rtol=1e-6)
    assert torch.equal(sparse["role_count"], full["role_count"])


def summed(loss_model, samples, indices, packing, dft=False):
    batch = micro_batch(samples, indices, pad_id=0, packing=packing, pack_length=512)
    return loss_model(**batch.tensors, dft=dft), batch


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_packed_or_padded_batch_equals_the_examples_one_by_one(packing, prepared, tiny_model_dir):
    spec = loss_spec("sft")
    samples, _ = stage_samples(prepared["tagged"].examples[:6], spec)
    loss_model = LossModel(load(tiny_model_dir))
    together, batch = summed(loss_model, samples, range(6), packing)
    assert batch.tensors["input_ids"].shape[0] == (2 if packing else 6)
    alone = [summed(loss_model, samples, [i], packing=False)[0] for i in range(6)]
    weight_sum = sum(s.weight_sum for s in samples)
    loss_together = together["total"] / weight_sum
    loss_alone = sum(a["total"] for a in alone) / weight_sum
    assert abs(loss_together.item() - loss_alone.item()) < 1e-5
    assert torch.equal(together["role_count"], sum(a["role_count"] for a in alone))
    per_role_together = together["role_nll"] / together["role_count"].clamp(min=1)
    per_role_alone = sum(a["role_nll"] for a in alone) / together["role_count"].clamp(min=1)
    assert torch.allclose(per_role_together, per_role_alone, atol=1e-5)
    # the gradients agree too: one backward of the batch against the sum of six
    params = [p for p in loss_model.parameters()]
    g_together = torch.autograd.grad(loss_together, params)
    g_alone = torch.autograd.grad(loss_alone, params)
    for a, b in zip(g_together, g_alone):
        assert torch.allclose(a, b, atol=1e-6)


def test_losses_of_zero_weight_roles_are_reported_when_asked(prepared, tiny_model_dir):
    spec = loss_spec("key")
    samples, _ = stage_samples(prepared["tagged"].examples[:3], spec)
    loss_model = LossModel(load(tiny_model_dir))
    batch = micro_batch(samples, range(3), pad_id=0, packing=True, pack_length=512)
    with_roles = loss_model(**batch.tensors, all_roles=True)
    answer_only = loss_model(**batch.tensors, all_roles=False)
    thinking, answer, eos = (ROLE_NAMES.index(r) for r in ("thinking", "answer", "eos"))
    counts = {name: sum(ex.roles.count(ROLE_NAMES.index(name)) for ex in prepared["tagged"].examples[:3])
              for name in ("thinking", "answer", "eos")}
    assert with_roles["role_count"][thinking] == counts["thinking"]  # every response token is some position's target
    assert with_roles["role_count"][answer] == counts["answer"] and with_roles["role_count"][eos] == counts["eos"]
    assert answer_only["role_count"][thinking] == 0 and answer_only["role_count"][answer] == counts["answer"]
    assert torch.equal(with_roles["role_nll"][answer], answer_only["role_nll"][answer])


# --------------------------------------------------------------------------- families that transform their logits

FAMILIES = {  # model type -> config values that make its logit transform bite on a random model (logits ~0.1-1)
    "granite": {"logits_scaling": 0.05},  # logits / 0.05
    "gemma2": {"final_logit_softcapping": 0.05, "head_dim": 16},  # 0.05 * tanh(logits / 0.05)
    "cohere": {"logit_scale": 20.0},  # logits * 20
}


def tiny_family_model(family: str, vocab_size: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family, vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  pad_token_id=0, bos_token_id=None, eos_token_id=2, **FAMILIES[family])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


@pytest.fixture(scope="module")
def packed_batch(prepared):
    samples, _ = stage_samples(prepared["tagged"].examples[:3], loss_spec("sft"))
    return micro_batch(samples, range(3), pad_id=0, packing=True, pack_length=512).tensors


def bare_output_layer(lm, hidden):
    return lm.get_output_embeddings()(hidden)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sparse_loss_equals_the_dense_loss_of_a_family_that_transforms_its_logits(family, packed_batch,
                                                                                  tiny_tokenizer, monkeypatch):
    from sftkey.train import objective

    model = tiny_family_model(family, len(tiny_tokenizer))
    assert model.config.model_type == family
    dense = LossModel(model, sparse_logits=False)(**packed_batch)
    sparse = LossModel(model)(**packed_batch)
    assert torch.allclose(sparse["total"], dense["total"], rtol=1e-5)
    assert torch.allclose(sparse["role_nll"], dense["role_nll"], rtol=1e-5)  # the no-grad per-role pass too
    assert torch.equal(sparse["role_count"], dense["role_count"])
    # without the family's transform the loss would be another one, and the probe says so
    monkeypatch.setattr(objective, "output_logits", bare_output_layer)
    with pytest.raises(objective.SparseLogitsError, match=f"model type '{family}'"):
        LossModel(model)(**packed_batch)
    unchecked = LossModel(model)
    unchecked.checked = True
    bare = unchecked(**packed_batch)
    print(family, abs(bare["total"].item() - dense["total"].item()) / dense["total"].item())
    assert abs(bare["total"].item() - dense["total"].item()) > 1e-3 * dense["total"].item()  # 100x the tolerance


def test_output_logits_leaves_a_family_without_a_transform_alone(tiny_model_dir):
    from sftkey.train.objective import output_logits

    model = load(tiny_model_dir)
    hidden = torch.randn(5, model.config.hidden_size)
    assert torch.equal(output_logits(model, hidden), model.get_output_embeddings()(hidden))


def scaled_llama(folder):
    """A family sftkey does not know: a Llama whose forward scales the logits after the output layer."""
    from transformers import LlamaForCausalLM

    class ScaledLlama(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0
            return out

    return ScaledLlama.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)


def test_a_model_that_transforms_its_logits_in_an_unknown_way_is_refused_sparse_and_accepted_dense(
        packed_batch, tiny_model_dir):
    from sftkey.train.objective import SparseLogitsError

    model = scaled_llama(tiny_model_dir)
    with pytest.raises(SparseLogitsError, match=r"ScaledLlama \(model type 'llama'\).*train\.sparse_logits: false"):
        LossModel(model)(**packed_batch)
    dense = LossModel(model, sparse_logits=False)(**packed_batch)
    unscaled = LossModel(load(tiny_model_dir), sparse_logits=False)(**packed_batch)
    assert torch.isfinite(dense["total"])
    assert abs(dense["total"].item() - unscaled["total"].item()) > 1e-3 * unscaled["total"].item()  # its own logits


def test_the_probe_runs_without_dropout_and_restores_training_mode(packed_batch, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attention_dropout=0.5,
                                                 use_safetensors=True)
    model.train()
    model.model.layers[0].eval()  # a module someone froze in eval mode stays so
    loss_model = LossModel(model)
    loss_model(**packed_batch)  # with dropout in the probe its two passes would differ and it would refuse
    assert loss_model.checked
    assert model.training and model.model.layers[1].training and not model.model.layers[0].training
