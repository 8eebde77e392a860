"""Token roles: what part of a training example a token belongs to.

Every token of a tokenized example gets exactly one role; an arm's loss is a mapping from role to weight.
"""

PROMPT = 0  # system/user turn and the assistant header: context, never supervised
THINKING = 1  # the reasoning, through the last token of `</Thinking>` (plain format: the reasoning)
ANSWER = 2  # after `</Thinking>` through `</Answer>` (plain format: the `#### N` line)
EOS = 3  # the turn-closing token(s) that generation must learn to emit

ROLE_NAMES = ("prompt", "thinking", "answer", "eos")
ROLE_IDS = {name: role for role, name in enumerate(ROLE_NAMES)}
