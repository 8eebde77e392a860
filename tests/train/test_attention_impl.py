"""Flash-attention varlen inputs for packed micro-batches, checked on CPU: flash attention itself is stood in by a
reference that attends within each segment the cumulative lengths give, so the loss must equal the sdpa path's."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from sftkey.config_file import ConfigError
from sftkey.loss import loss_spec
from sftkey.train.attention import check_attn_implementation, is_flash, varlen_kwargs
from sftkey.train.batching import micro_batch, stage_samples
from sftkey.train.objective import LossModel


@pytest.fixture(scope="module")
def samples(tiny_tokenizer, arith):
    from sftkey.data import DataConfig
    from sftkey.prepare import PrepareConfig, prepare

    prepared = prepare(PrepareConfig(DataConfig("gsm8k", path=str(arith)), tagged=True, max_length=256), tiny_tokenizer)
    return stage_samples(prepared.examples[:4], loss_spec("sft"))[0]


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True,
                                                attn_implementation="sdpa")


def test_varlen_kwargs_are_the_example_boundaries():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    out = varlen_kwargs(position_ids)
    assert out["cu_seq_lens_q"].tolist() == [0, 3, 5, 9] and out["cu_seq_lens_q"].dtype == torch.int32
    assert out["cu_seq_lens_k"] is out["cu_seq_lens_q"]
    assert out["max_length_q"] == out["max_length_k"] == 4
    with pytest.raises(ValueError, match="one packed row, got 2 rows"):
        varlen_kwargs(torch.zeros(2, 3, dtype=torch.long))


def test_flash_micro_batches_are_one_row_of_restarting_positions_and_no_mask(samples):
    lengths = [len(s) for s in samples]
    flash = micro_batch(samples, range(4), pad_id=0, packing=True, pack_length=256,
                        attn_implementation="flash_attention_2")
    assert "attention_mask" not in flash.tensors
    assert flash.tensors["input_ids"].shape == (1, sum(lengths))  # one row, no padding, not capped by pack_length
    assert flash.tensors["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    assert varlen_kwargs(flash.tensors["position_ids"])["cu_seq_lens_q"].tolist() == [
        sum(lengths[:i]) for i in range(5)]
    sdpa = micro_batch(samples, range(4), pad_id=0, packing=True, pack_length=256)
    assert sdpa.tensors["input_ids"].shape[0] > 1  # sdpa keeps rows of at most pack_length


def segment_attention(calls):
    """A stand-in for transformers' flash_attention_forward: causal attention within each cu_seq_lens segment."""

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        calls.append({"attention_mask": attention_mask, **{k: kwargs.get(k) for k in
                                                          ("cu_seq_lens_q", "max_length_q", "position_ids")}})
        given = kwargs.get("cu_seq_lens_q")  # the sparse-logits probe is one unpacked sequence
        cu = given.tolist() if given is not None else [0, query.shape[2]]
        groups = query.shape[1] // key.shape[1]  # [1, heads, width, head_dim]; grouped-query keys repeated
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        parts = [F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True,
                                                scale=scaling) for a, b in zip(cu[:-1], cu[1:])]
        return torch.cat(parts, 2).transpose(1, 2).contiguous(), None  # [1, width, heads, head_dim]

    return attend


def test_the_varlen_path_hands_flash_the_boundaries_and_keeps_the_sdpa_loss(samples, tiny_model_dir, monkeypatch):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    batch = micro_batch(samples, range(4), pad_id=0, packing=True, pack_length=1024,
                        attn_implementation="flash_attention_2")
    lengths = [len(s) for s in samples]
    sdpa_calls = []
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def recorded_sdpa(module, query, key, value, attention_mask, **kwargs):
        sdpa_calls.append({"attention_mask": attention_mask, "cu_seq_lens_q": kwargs.get("cu_seq_lens_q")})
        return sdpa(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", recorded_sdpa)
    eager = LossModel(load(tiny_model_dir))(**batch.tensors)
    # sdpa, unchanged: a block-diagonal [1, 1, width, width] mask from the restarts, no varlen arguments
    assert sdpa_calls and all(c["cu_seq_lens_q"] is None for c in sdpa_calls)
    assert sdpa_calls[-1]["attention_mask"].shape == (1, 1, sum(lengths), sum(lengths))

    flash_calls = []
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "flash_attention_2", segment_attention(flash_calls))
    model = load(tiny_model_dir)
    model.config._attn_implementation = "flash_attention_2"  # flash_attn cannot load on CPU: the stand-in runs
    varlen = LossModel(model, varlen=True)(**batch.tensors)
    expected_cu = [sum(lengths[:i]) for i in range(5)]
    layers = model.config.num_hidden_layers
    assert len(flash_calls) == 3 * layers  # the sparse-logits probe (model and decoder), then the batch
    for call in flash_calls[-layers:]:
        assert call["attention_mask"] is None  # no 4D block mask is built
        assert call["cu_seq_lens_q"].tolist() == expected_cu and call["max_length_q"] == max(lengths)
    assert varlen["total"].item() == pytest.approx(eager["total"].item(), rel=1e-5)
    assert torch.allclose(varlen["role_nll"], eager["role_nll"], rtol=1e-5)
    assert torch.equal(varlen["role_count"], eager["role_count"])


def test_flash_attention_names():
    assert is_flash("flash_attention_2") and is_flash("flash_attention_3") and is_flash("kernels-community/flash-attn2")
    assert not is_flash("sdpa") and not is_flash("eager") and not is_flash("flex_attention")


def test_flash_attention_without_cuda_or_its_package_is_a_config_error(monkeypatch):
    check_attn_implementation("sdpa", cuda=False)  # nothing to check
    with pytest.raises(ConfigError) as error:
        check_attn_implementation("flash_attention_2", cuda=False)
    assert str(error.value) == ("train.attn_implementation 'flash_attention_2': flash attention needs a CUDA GPU and "
                                "none is available here; use sdpa (it keeps packed examples apart with a block mask)")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("flash_attn", "kernels") else real(name, *a))
    with pytest.raises(ConfigError) as error:
        check_attn_implementation("flash_attention_2", cuda=True)
    assert str(error.value) == ("train.attn_implementation 'flash_attention_2': the flash_attn package is not "
                                "installed: pip install flash-attn, or use sdpa")


def test_the_trainer_refuses_flash_attention_on_this_machine(make_config):
    from sftkey.train.trainer import train_arm

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine may run flash attention")
    config = make_config({"train": {"attn_implementation": "flash_attention_2"}})
    with pytest.raises(ConfigError, match="flash attention needs a CUDA GPU"):
        train_arm(config, "sft_tag", 0)
