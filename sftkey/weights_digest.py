"""The content hash of a model's parameters as they compute: what the promotion gate compares between the model a
benchmark scored and the model the registry serves. A file hash cannot do that job: the same tensors saved by
another writer, in other shards or with other metadata hash differently, and a checkpoint scored in bf16 is not the
file it was loaded from."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


def parameters_sha256(model: "nn.Module") -> str:
    """sha256 over the model's parameters sorted by name: for each, the line "<name> <dtype> <shape>" then its
    bytes. A tied weight counts once (as `named_parameters()` lists it); buffers are left out (a causal LM's are
    recomputed at load, e.g. rotary frequencies). Equal hashes: the same numbers in the same dtype under the same
    names, wherever the tensors sit (CPU or GPU) and however they were stored."""
    import torch

    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters(), key=lambda item: item[0]):
        tensor = parameter.detach().to("cpu").contiguous()
        digest.update(f"{name} {str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}\n".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()
