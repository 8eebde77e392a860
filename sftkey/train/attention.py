"""Flash attention for packed micro-batches: the check that it can run here, and its variable-length inputs.

Under flash attention a packed micro-batch is one row (sftkey.train.batching) with position ids that restart at 0
per example and no attention mask, so no [rows, 1, width, width] block mask is ever built. transformers 5.17 would
find the example boundaries from those restarts in every layer (a `nonzero` and a device sync each time);
`varlen_kwargs` finds them once per forward and hands the cumulative lengths to every layer, as the flash-attention
varlen kernel takes them.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from sftkey.config_file import ConfigError

if TYPE_CHECKING:
    import torch

# transformers 5.17's flash-attention names -> (module it imports, what to install)
FLASH_PACKAGES = {
    "flash_attention_2": ("flash_attn", "pip install flash-attn"),
    "flash_attention_3": ("flash_attn_interface", "install FlashAttention-3 (flash-attn hopper/, Hopper GPUs)"),
    "flash_attention_4": ("flash_attn", "pip install flash-attn-4"),
}


def is_flash(attn_implementation: str) -> bool:
    """A flash-attention implementation: transformers' own names, or a hub kernel such as kernels-community/flash-attn2."""
    return attn_implementation in FLASH_PACKAGES or ("/" in attn_implementation and "flash" in attn_implementation)


def check_attn_implementation(attn_implementation: str, cuda: bool | None = None) -> None:
    """Refuse flash attention where it cannot run (no CUDA, or its package missing), before transformers does with
    a longer story. cuda: whether a CUDA device is usable (default: ask torch)."""
    if not is_flash(attn_implementation):
        return
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    where = f"train.attn_implementation {attn_implementation!r}"
    if not cuda:
        raise ConfigError(f"{where}: flash attention needs a CUDA GPU and none is available here; use sdpa "
                          "(it keeps packed examples apart with a block mask)")
    if "/" in attn_implementation:  # a hub kernel: transformers loads it through the kernels package
        if importlib.util.find_spec("kernels") is None:
            raise ConfigError(f"{where}: hub kernels need the kernels package: pip install kernels, or use "
                              "flash_attention_2 or sdpa")
        return
    module, install = FLASH_PACKAGES[attn_implementation]
    # transformers falls back to the hub kernel (kernels package) when the flash package is missing
    if importlib.util.find_spec(module) is None and importlib.util.find_spec("kernels") is None:
        raise ConfigError(f"{where}: the {module} package is not installed: {install}, or use sdpa")


def varlen_kwargs(position_ids: "torch.Tensor") -> dict:
    """The flash-attention varlen arguments of a one-row packed micro-batch: position_ids [1, width] restart at 0
    where each example starts. cu_seq_lens [examples + 1] (int32) are the examples' start offsets and the width;
    max_length is the longest example, a Python int as the kernel takes it."""
    import torch

    if position_ids.shape[0] != 1:
        raise ValueError(f"varlen attention needs one packed row, got {position_ids.shape[0]} rows")
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().reshape(-1)  # [examples]; position 0 always starts an example
    width = torch.tensor([flat.numel()], device=flat.device)
    cu = torch.cat([starts, width]).to(torch.int32)
    longest = int(cu.diff().max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
