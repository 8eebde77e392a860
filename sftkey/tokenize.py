"""Token roles: the chat-formatted example as token ids, each with a role (prompt, thinking, answer, eos).

Roles come from character spans of the whole rendered text through the tokenizer's offset mapping, never
from tokenizing pieces separately (pieces tokenize differently from the whole).

Boundary rule: a token takes the role of its first character. A token that straddles the end of
`</Thinking>` therefore counts as thinking, which is the method's stage-2 rule ("the loss starts after the
last token of `</Thinking>`"), and a token straddling the end of the prompt counts as prompt (the model is
given it at generation time).

The evaluation prompt is the text that precedes the response in the training conversation, cut at a sentinel
response, not the template's generation prompt: a template may put text between the two (Qwen3 an empty
`<think>\n\n</think>\n\n` block), which training sees as context and generation must be given too.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass

from sftkey.errors import UserError
from sftkey.format import Response
from sftkey.roles import ANSWER, EOS, PROMPT, ROLE_NAMES, THINKING

FALLBACK_PROMPT = "Question: {question}\nAnswer: "  # for tokenizers without a chat template
SENTINEL_RESPONSE = "SftkeyResponse7"  # no whitespace or markup, so no template strips or splits it
GAP_QUESTION = "What is 1 + 1?"  # any question shows the gap


class TokenizerError(UserError, ValueError):
    """The tokenizer cannot produce what role assignment needs."""


@dataclass
class TokenizedExample:
    uid: str
    input_ids: list[int]
    roles: list[int]

    def role_counts(self) -> dict[str, int]:
        return {name: self.roles.count(role) for role, name in enumerate(ROLE_NAMES)}


def check_tokenizer(tokenizer) -> None:
    name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
    if not getattr(tokenizer, "is_fast", False):
        raise TokenizerError(
            f"tokenizer {name!r} is not a fast tokenizer: roles need its offset mapping. "
            "Load it with AutoTokenizer.from_pretrained(..., use_fast=True) or convert it to tokenizer.json."
        )
    if not tokenizer.eos_token:
        raise TokenizerError(f"tokenizer {name!r} has no eos token: set tokenizer.eos_token to the turn-closing token")


def format_prompt(tokenizer, question: str) -> str:
    """The text the model sees before it answers: exactly what precedes the response in a training conversation."""
    if tokenizer.chat_template:
        text = format_conversation(tokenizer, question, SENTINEL_RESPONSE)
        if text.count(SENTINEL_RESPONSE) != 1:
            raise TokenizerError(
                f"the chat template of {_name(tokenizer)!r} drops or rewrites the assistant's response (a response "
                f"{SENTINEL_RESPONSE!r} shows {text.count(SENTINEL_RESPONSE)} times, not once): the evaluation prompt "
                "and the roles need it verbatim. Use a template that renders the assistant content as given."
            )
        return text[: text.index(SENTINEL_RESPONSE)]
    return FALLBACK_PROMPT.format(question=question)


def template_gap(tokenizer, question: str = GAP_QUESTION) -> str:
    """The text a chat template puts between its generation prompt and the response ('' for most templates).

    Training sees it as context and `format_prompt` ends with it.
    """
    if not tokenizer.chat_template:
        return ""
    messages = [{"role": "user", "content": question}]
    generation = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = format_prompt(tokenizer, question)
    return prompt[len(os.path.commonprefix([generation, prompt])) :]


def format_conversation(tokenizer, question: str, response: str) -> str:
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": response}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return FALLBACK_PROMPT.format(question=question) + response + tokenizer.eos_token


def role_boundaries(tokenizer, question: str, response: Response) -> tuple[str, list[int], list[int]]:
    """The full text and its role spans as (starts, roles): role[k] holds from starts[k] to starts[k+1]."""
    text = format_conversation(tokenizer, question, response.text)
    prompt = format_prompt(tokenizer, question)
    if not text.startswith(prompt + response.text):
        raise TokenizerError(
            f"the chat template of {_name(tokenizer)!r} does not render the response verbatim right after the "
            "evaluation prompt (it rewrites the response, or what precedes it depends on the response); roles "
            "cannot be placed. Use a template that renders the assistant content as given."
        )
    start = len(prompt)
    end = start + len(response.text)
    eos_at = text.find(tokenizer.eos_token, end)
    if eos_at < 0:
        raise TokenizerError(
            f"the chat template of {_name(tokenizer)!r} does not close the assistant turn with "
            f"eos {tokenizer.eos_token!r}; set tokenizer.eos_token to the turn-closing token"
        )
    eos_end = eos_at + len(tokenizer.eos_token)
    starts = [0, start, start + response.answer_start, end, eos_end]
    return text, starts, [PROMPT, THINKING, ANSWER, EOS, PROMPT]


def roles_from_offsets(offsets: list[tuple[int, int]], starts: list[int], roles: list[int]) -> list[int]:
    """Each token's role is the role of its first character (see the module docstring)."""
    return [roles[bisect.bisect_right(starts, begin) - 1] for begin, _ in offsets]


def tokenize_examples(
    tokenizer, items: list[tuple[str, str, Response]], batch_size: int = 1000
) -> list[TokenizedExample]:
    """(uid, question, response) -> token ids and roles, tokenizing whole texts in batches."""
    check_tokenizer(tokenizer)
    out = []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        spans = [role_boundaries(tokenizer, question, response) for _, question, response in chunk]
        encoded = tokenizer(
            [text for text, _, _ in spans], add_special_tokens=False, return_offsets_mapping=True
        )
        for (uid, _, _), (_, starts, roles), ids, offsets in zip(
            chunk, spans, encoded["input_ids"], encoded["offset_mapping"]
        ):
            out.append(TokenizedExample(uid, list(ids), roles_from_offsets(offsets, starts, roles)))
    return out


def tokenize_prompt(tokenizer, question: str) -> list[int]:
    """Prompt ids for generation, tokenized exactly as the training text's prompt part."""
    return tokenizer(format_prompt(tokenizer, question), add_special_tokens=False)["input_ids"]


def _name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
