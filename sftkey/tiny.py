"""A tiny randomly initialised Llama with a locally trained tokenizer: tests and smoke runs, offline, in seconds.

The tokenizer is a byte-level BPE trained on a fixed corpus, so its ids are identical on every machine; its
chat template has the same shape as SmolLM2's (`<|im_start|>role\\n...<|im_end|>\\n`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from sftkey.format import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN

TINY_MODEL = "tiny"
VOCAB_SIZE = 400
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Small arithmetic word problems in both response formats: enough merges to make multi-character tokens
# (so that tokens can straddle a role boundary), few enough to train in milliseconds.
_CORPUS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May?",
    "Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips altogether in April and May.",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.",
    "What is the value of x if 3x + 5 = 20? The answer is 5. Compute \\frac{1}{2} + \\sqrt{4}.",
    "( 76.0 - 25.0 ) = 51. There were 76 apples and 25 were eaten. How many are left?",
    f"{THINK_OPEN} 12 * 3 = 36 {THINK_CLOSE} {ANSWER_OPEN} 36 {ANSWER_CLOSE}",
    "#### 72\n#### 10\n#### 51",
    "Question: Answer: user assistant system",
]


def train_tiny_tokenizer():
    """A PreTrainedTokenizerFast with a chat template, eos `<|im_end|>` (id 2), trained deterministically."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        chat_template=CHAT_TEMPLATE,
    )


def tiny_model_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=2,
        pad_token_id=0,
    )


def build_tiny_model(out: Path, seed: int = 0) -> Path:
    """Write a tiny random Llama + tokenizer (safetensors) to `out`, atomically."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out)
    tokenizer = train_tiny_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_model_config(len(tokenizer)))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, out)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure_tiny_model(home: Path | None = None) -> Path:
    """The tiny model folder under `$SFTKEY_HOME/models/tiny`, built on first use."""
    from sftkey.paths import sftkey_home

    out = (Path(home) if home else sftkey_home()) / "models" / TINY_MODEL
    if not (out / "config.json").exists():
        build_tiny_model(out)
    return out
