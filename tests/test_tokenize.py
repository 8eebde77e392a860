import pytest

from sftkey.annotate import annotate
from sftkey.data import Record
from sftkey.format import render, render_tagged
from sftkey.loss import loss_spec
from sftkey.roles import ANSWER, EOS, PROMPT, THINKING
from sftkey.tokenize import (
    TokenizerError,
    format_prompt,
    roles_from_offsets,
    template_gap,
    tokenize_examples,
    tokenize_prompt,
)

# One example per data set, written in each set's own format (not copied from the data).
EXAMPLES = {
    "gsm8k": Record("g1", "Ann has 3 bags of 4 apples. How many apples?", "3 * 4 = <<3*4=12>>12 apples.\n#### 12"),
    "math500": Record(
        "m1", "Compute $\\frac{1}{2} + \\frac{1}{4}$.",
        "We add: $\\frac{2}{4} + \\frac{1}{4} = \\boxed{\\frac{3}{4}}$.", "\\frac{3}{4}",
    ),
    "svamp": Record("chal-9", "There were 76 apples and 25 were eaten. How many are left?", "( 76.0 - 25.0 )", "51"),
}

# What each arm supervises, as text: SFT-Tag/weighted/DFT the whole tagged response, Key the answer span,
# SFT (plain) the plain worked solution; always with the turn-closing token.
SUPERVISED_TEXT = {
    ("gsm8k", "sft_tag"): "<Thinking> 3 * 4 = 12 apples. </Thinking> <Answer> 12 </Answer><|im_end|>",
    ("gsm8k", "key_tag"): " <Answer> 12 </Answer><|im_end|>",
    ("gsm8k", "sft_plain"): "3 * 4 = 12 apples.\n#### 12<|im_end|>",
    ("math500", "sft_tag"): "<Thinking> We add: $\\frac{2}{4} + \\frac{1}{4} = \\boxed{\\frac{3}{4}}$. </Thinking>"
                            " <Answer> \\frac{3}{4} </Answer><|im_end|>",
    ("math500", "key_tag"): " <Answer> \\frac{3}{4} </Answer><|im_end|>",
    ("math500", "sft_plain"): "We add: $\\frac{2}{4} + \\frac{1}{4} = \\boxed{\\frac{3}{4}}$.\n#### \\frac{3}{4}<|im_end|>",
    ("svamp", "sft_tag"): "<Thinking> ( 76.0 - 25.0 ) = 51 </Thinking> <Answer> 51 </Answer><|im_end|>",
    ("svamp", "key_tag"): " <Answer> 51 </Answer><|im_end|>",
    ("svamp", "sft_plain"): "( 76.0 - 25.0 ) = 51\n#### 51<|im_end|>",
}

# The exact supervised ids with the tiny tokenizer (sftkey.tiny, trained deterministically).
TINY_IDS = {
    ("gsm8k", "sft_tag"): [30, 355, 32, 288, 399, 223, 22, 274, 223, 314, 261, 385, 380, 16, 352, 355, 32, 304,
                           315, 32, 223, 314, 352, 315, 32, 2],
    ("gsm8k", "key_tag"): [304, 315, 32, 223, 314, 352, 315, 32, 2],
    ("gsm8k", "sft_plain"): [21, 399, 223, 22, 274, 223, 314, 261, 385, 380, 16, 201, 308, 223, 314, 2],
    ("math500", "sft_tag"): [30, 355, 32, 223, 57, 71, 261, 70, 70, 28, 397, 62, 377, 370, 93, 20, 396, 22, 95,
                             332, 334, 377, 370, 93, 19, 396, 22, 95, 274, 334, 68, 81, 90, 71, 70, 93, 62, 377,
                             370, 93, 21, 396, 22, 95, 95, 6, 16, 352, 355, 32, 304, 315, 32, 334, 377, 370, 93,
                             21, 396, 22, 95, 352, 315, 32, 2],
    ("math500", "key_tag"): [304, 315, 32, 334, 377, 370, 93, 21, 396, 22, 95, 352, 315, 32, 2],
    ("math500", "sft_plain"): [57, 71, 261, 70, 70, 28, 397, 62, 377, 370, 93, 20, 396, 22, 95, 332, 334, 377,
                               370, 93, 19, 396, 22, 95, 274, 334, 68, 81, 90, 71, 70, 93, 62, 377, 370, 93, 21,
                               396, 22, 95, 95, 6, 16, 201, 308, 334, 377, 370, 93, 21, 396, 22, 95, 2],
    ("svamp", "sft_tag"): [30, 355, 32, 223, 10, 351, 16, 18, 223, 15, 348, 16, 18, 398, 274, 347, 352, 355, 32,
                           304, 315, 32, 347, 352, 315, 32, 2],
    ("svamp", "key_tag"): [304, 315, 32, 347, 352, 315, 32, 2],
    ("svamp", "sft_plain"): [10, 351, 16, 18, 223, 15, 348, 16, 18, 398, 274, 347, 201, 308, 347, 2],
}

# The same with SmolLM2-135M-Instruct's tokenizer (the default model), when it is cached.
SMOLLM2_IDS = {
    ("gsm8k", "sft_tag"): [44, 46481, 46, 216, 35, 1672, 216, 36, 446, 216, 33, 34, 13855, 30, 22577, 46481, 46,
                           2067, 21350, 46, 216, 33, 34, 22577, 21350, 46, 2],
    ("gsm8k", "key_tag"): [2067, 21350, 46, 216, 33, 34, 22577, 21350, 46, 2],
    ("gsm8k", "sft_plain"): [35, 1672, 216, 36, 446, 216, 33, 34, 13855, 30, 198, 1229, 216, 33, 34, 2],
    ("math500", "sft_tag"): [44, 46481, 46, 1046, 803, 42, 19573, 18169, 107, 34, 15009, 36, 109, 1232, 3814, 18169,
                             107, 33, 15009, 36, 109, 446, 3814, 4810, 277, 26754, 18169, 107, 35, 15009, 36, 17859,
                             28422, 22577, 46481, 46, 2067, 21350, 46, 3814, 18169, 107, 35, 15009, 36, 109, 22577,
                             21350, 46, 2],
    ("math500", "key_tag"): [2067, 21350, 46, 3814, 18169, 107, 35, 15009, 36, 109, 22577, 21350, 46, 2],
    ("math500", "sft_plain"): [1882, 803, 42, 19573, 18169, 107, 34, 15009, 36, 109, 1232, 3814, 18169, 107, 33,
                               15009, 36, 109, 446, 3814, 4810, 277, 26754, 18169, 107, 35, 15009, 36, 17859, 28422,
                               198, 1229, 3814, 18169, 107, 35, 15009, 36, 109, 2],
    ("svamp", "sft_tag"): [44, 46481, 46, 365, 216, 39, 38, 30, 32, 731, 216, 34, 37, 30, 32, 2481, 446, 216, 37,
                           33, 22577, 46481, 46, 2067, 21350, 46, 216, 37, 33, 22577, 21350, 46, 2],
    ("svamp", "key_tag"): [2067, 21350, 46, 216, 37, 33, 22577, 21350, 46, 2],
    ("svamp", "sft_plain"): [24, 216, 39, 38, 30, 32, 731, 216, 34, 37, 30, 32, 2481, 446, 216, 37, 33, 198, 1229,
                             216, 37, 33, 2],
}

ARMS = {"sft_tag": (True, "sft"), "key_tag": (True, "key"), "sft_plain": (False, "sft")}


def supervised(tokenizer, dataset, arm, loss=None):
    tagged, preset = ARMS[arm]
    annotated = annotate(dataset, [EXAMPLES[dataset]])[0][0]
    response = render(annotated.reasoning, annotated.answer, tagged)
    example = tokenize_examples(tokenizer, [(annotated.uid, annotated.question, response)])[0]
    weights = loss_spec(loss or preset).token_weights(example.roles)
    return [t for t, w in zip(example.input_ids, weights) if w > 0], example


@pytest.mark.parametrize("dataset,arm", list(TINY_IDS))
def test_supervised_ids_tiny(tiny_tokenizer, dataset, arm):
    ids, _ = supervised(tiny_tokenizer, dataset, arm)
    assert ids == TINY_IDS[(dataset, arm)]
    assert tiny_tokenizer.decode(ids) == SUPERVISED_TEXT[(dataset, arm)]


@pytest.mark.parametrize("loss", ["weighted", "dft"])
def test_weighted_and_dft_supervise_the_whole_tagged_response(tiny_tokenizer, loss):
    ids, _ = supervised(tiny_tokenizer, "gsm8k", "sft_tag", loss)
    assert ids == TINY_IDS[("gsm8k", "sft_tag")]


@pytest.mark.parametrize("dataset,arm", list(SMOLLM2_IDS))
def test_supervised_ids_smollm2(smollm2_tokenizer, dataset, arm):
    ids, _ = supervised(smollm2_tokenizer, dataset, arm)
    assert ids == SMOLLM2_IDS[(dataset, arm)]
    assert smollm2_tokenizer.decode(ids) == SUPERVISED_TEXT[(dataset, arm)]
    assert ids[-1] == smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>") == 2


def test_roles_of_the_chat_formatted_example(tiny_tokenizer):
    _, example = supervised(tiny_tokenizer, "svamp", "sft_tag")
    pieces = [tiny_tokenizer.decode([i]) for i in example.input_ids]
    by_role = {role: "".join(p for p, r in zip(pieces, example.roles) if r == role) for role in range(4)}
    assert by_role[PROMPT] == (
        "<|im_start|>user\nThere were 76 apples and 25 were eaten. How many are left?<|im_end|>\n"
        "<|im_start|>assistant\n\n"  # the trailing newline after <|im_end|> is context, not learned
    )
    assert by_role[THINKING] == "<Thinking> ( 76.0 - 25.0 ) = 51 </Thinking>"
    assert by_role[ANSWER] == " <Answer> 51 </Answer>"
    assert by_role[EOS] == "<|im_end|>"
    # The prompt part of the training ids is exactly what generation feeds the model.
    prompt = tokenize_prompt(tiny_tokenizer, EXAMPLES["svamp"].question)
    assert example.input_ids[: len(prompt)] == prompt


def straddling_tokenizer():
    """Byte-level BPE with no pre-tokenizer split, trained so that `> <` is one token: it straddles the
    end of `</Thinking>` and the start of the answer span."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=259, special_tokens=["<|im_end|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([f"{a}> <{b}" for a in "abcdefgh" for b in "ijklmnop"], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")


def test_a_token_straddling_a_boundary_takes_the_role_of_its_first_character():
    tokenizer = straddling_tokenizer()  # no chat template: the Question:/Answer: fallback
    example = tokenize_examples(tokenizer, [("s", "Hi?", render_tagged("1+1=2", "2"))])[0]
    pieces = [tokenizer.decode([i]) for i in example.input_ids]
    straddler = pieces.index("> <")
    assert example.roles[straddler] == THINKING  # it holds the last character of </Thinking>
    key_ids = [t for t, w in zip(example.input_ids, loss_spec("key").token_weights(example.roles)) if w > 0]
    assert tokenizer.decode(key_ids) == "Answer> 2 </Answer><|im_end|>"
    assert "".join(pieces[: example.roles.index(THINKING)]) == "Question: Hi?\nAnswer: "


def test_roles_from_offsets_rule():
    starts, roles = [0, 10, 20, 30, 31], [PROMPT, THINKING, ANSWER, EOS, PROMPT]
    offsets = [(0, 9), (9, 12), (12, 19), (19, 22), (22, 30), (30, 31), (31, 32)]
    assert roles_from_offsets(offsets, starts, roles) == [PROMPT, PROMPT, THINKING, THINKING, ANSWER, EOS, PROMPT]


def test_a_tokenizer_without_offsets_is_refused():
    from transformers import ByT5Tokenizer

    with pytest.raises(TokenizerError, match="not a fast tokenizer: roles need its offset mapping"):
        tokenize_examples(ByT5Tokenizer(), [("x", "q", render_tagged("r", "1"))])


def test_fallback_prompt_without_chat_template():
    tokenizer = straddling_tokenizer()
    assert format_prompt(tokenizer, "Hi?") == "Question: Hi?\nAnswer: "


# --------------------------------------------------------------------------- templates with text before the response

THINK_BLOCK = "<think>\n\n</think>\n\n"
# Qwen3's shape (written here, not copied): the last assistant turn opens with an empty think block, which the
# generation prompt leaves out.
GAP_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' and loop.last %}"
    "{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tokenizer_with_template(template):
    from sftkey.tiny import train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


def test_the_evaluation_prompt_ends_with_what_the_template_inserts_before_the_response(tiny_tokenizer):
    tokenizer = tokenizer_with_template(GAP_TEMPLATE)
    question = EXAMPLES["svamp"].question
    generation = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                               add_generation_prompt=True)
    assert generation == f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    assert format_prompt(tokenizer, question) == generation + THINK_BLOCK
    assert template_gap(tokenizer) == THINK_BLOCK
    # templates without a gap keep their generation prompt exactly
    assert template_gap(tiny_tokenizer) == "" and template_gap(straddling_tokenizer()) == ""
    assert format_prompt(tiny_tokenizer, question) == generation


def test_the_inserted_block_is_prompt_and_the_evaluation_prompt_is_a_prefix_of_the_training_ids():
    tokenizer = tokenizer_with_template(GAP_TEMPLATE)
    ids, example = supervised(tokenizer, "svamp", "sft_tag")
    assert ids == TINY_IDS[("svamp", "sft_tag")]  # the response tokens are the ones without the block
    pieces = [tokenizer.decode([i]) for i in example.input_ids]
    by_role = {role: "".join(p for p, r in zip(pieces, example.roles) if r == role) for role in range(4)}
    assert by_role[PROMPT] == (
        "<|im_start|>user\nThere were 76 apples and 25 were eaten. How many are left?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"  # the block is context, as its question is
        "\n"  # the newline after <|im_end|>
    )
    assert by_role[THINKING] == "<Thinking> ( 76.0 - 25.0 ) = 51 </Thinking>"
    assert by_role[ANSWER] == " <Answer> 51 </Answer>" and by_role[EOS] == "<|im_end|>"
    prompt = tokenize_prompt(tokenizer, EXAMPLES["svamp"].question)
    assert example.input_ids[: len(prompt)] == prompt
    assert set(example.roles[: len(prompt)]) == {PROMPT} and example.roles[len(prompt)] == THINKING
    assert tokenizer.decode(prompt).endswith(THINK_BLOCK)


@pytest.mark.parametrize("content,match", [
    ("message['content'] | upper", "drops or rewrites the assistant's response"),  # the sentinel is gone
    ("''", "drops or rewrites the assistant's response"),
    ("message['content'] + message['content']", "shows 2 times, not once"),
    ("message['content'] | replace('<Thinking>', '<think>')", "does not render the response verbatim"),
])
def test_a_template_that_drops_or_rewrites_the_response_is_refused(content, match):
    from sftkey.tiny import CHAT_TEMPLATE

    tokenizer = tokenizer_with_template(CHAT_TEMPLATE.replace(
        "message['content']", f"({content} if message['role'] == 'assistant' else message['content'])"))
    with pytest.raises(TokenizerError, match=match):
        tokenize_examples(tokenizer, [("x", "Hi?", render_tagged("1+1=2", "2"))])
