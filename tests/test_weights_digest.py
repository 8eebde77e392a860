"""The parameters hash the promotion gate compares: equal for the same numbers however they were stored, different
for any change of a value, a dtype or a name."""

from __future__ import annotations

import hashlib

import torch

from sftkey.models import load_model
from sftkey.weights_digest import parameters_sha256


def file_sha256(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def test_the_same_weights_in_other_files_hash_the_same(tiny_model_dir, tmp_path):
    model = load_model(tiny_model_dir)
    model.save_pretrained(tmp_path / "shards", max_shard_size="100KB")  # several files, other metadata
    assert len(file_sha256(tmp_path / "shards")) > 1
    assert file_sha256(tmp_path / "shards") != file_sha256(tiny_model_dir)
    assert parameters_sha256(load_model(tmp_path / "shards")) == parameters_sha256(model)


def test_a_changed_value_dtype_or_name_changes_the_hash(tiny_model_dir):
    model = load_model(tiny_model_dir)
    original = parameters_sha256(model)
    assert len(original) == 64 and original == parameters_sha256(load_model(tiny_model_dir))
    assert parameters_sha256(load_model(tiny_model_dir, dtype="bfloat16")) != original
    weight = model.model.layers[0].mlp.up_proj.weight
    kept = weight[3, 5].item()
    with torch.no_grad():
        weight[3, 5] = torch.nextafter(weight[3, 5], torch.tensor(1.0))  # one number of one matrix, by one ulp
    assert parameters_sha256(model) != original
    with torch.no_grad():
        weight[3, 5] = kept
    assert parameters_sha256(model) == original  # back to the same float
    same_bytes = torch.nn.Linear(4, 4, bias=False)
    renamed = torch.nn.Module()
    renamed.other = same_bytes
    named = torch.nn.Module()
    named.linear = same_bytes
    assert parameters_sha256(renamed) != parameters_sha256(named)


def test_a_tied_weight_counts_once(tiny_model_dir):
    model = load_model(tiny_model_dir)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    names = [name for name, _ in model.named_parameters()]
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    untied = torch.nn.Module()
    untied.embed = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    tied = torch.nn.Module()
    tied.embed = untied.embed
    tied.head = untied.embed  # the same Parameter under a second name
    assert parameters_sha256(tied) == parameters_sha256(untied)
