"""The MLflow pyfunc model that a registered sftkey model is logged as: chat in, generated text out.

`mlflow.pyfunc.load_model(uri).predict(["What is 2+3?"])` (or `[{"messages": [...]}]`, or a DataFrame with a
`messages` column) applies the model's chat template and generates with `sftkey.generate`, greedy by default:
what `sftkey eval` measures is what `mlflow models serve` answers.

Logged as a model from code (MLflow reads this file and `set_model` below, no pickle); the sftkey package
travels with it as `code_paths`. Only mlflow, pandas and sftkey are imported here, never dagster.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from pydantic import BaseModel

WEIGHTS_ARTIFACT = "weights"  # artifact key of the save_pretrained folder (weights in the scored dtype, tokenizer)
DEFAULT_MAX_NEW_TOKENS = 256  # sftkey.generate.GENERIC_MAX_NEW_TOKENS; override with model_config


class Message(BaseModel):
    role: str
    content: str


class ChatRequest(BaseModel):
    messages: list[Message]


def conversations(model_input: Any) -> list[list[dict[str, str]]]:
    """Each request as a message list: a bare string is one user turn; a dict or row holds `messages`."""
    if isinstance(model_input, pd.DataFrame):
        column = "messages" if "messages" in model_input.columns else model_input.columns[0]
        model_input = model_input[column].tolist()
    if isinstance(model_input, (str, dict, ChatRequest)):
        model_input = [model_input]
    out = []
    for item in model_input:
        if isinstance(item, ChatRequest):
            item = item.model_dump()
        if isinstance(item, str):
            out.append([{"role": "user", "content": item}])
        elif isinstance(item, dict) and isinstance(item.get("messages"), list):
            out.append([{"role": m["role"], "content": m["content"]} for m in item["messages"]])
        elif isinstance(item, list):  # a `messages` cell of a DataFrame
            out.append([{"role": m["role"], "content": m["content"]} for m in item])
        else:
            raise ValueError(f"a request is a question string or {{'messages': [{{'role', 'content'}}, ...]}}, "
                             f"got {type(item).__name__}: {str(item)[:80]}")
    return out


def chat_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The prompt text after the conversation: the template's generation prompt plus the gap that training saw
    before a response (sftkey.tokenize.template_gap), so a one-question chat is exactly the evaluation prompt."""
    from sftkey.tokenize import template_gap

    if not tokenizer.chat_template:
        raise ValueError("the logged tokenizer has no chat template: log a model whose tokenizer has one")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + template_gap(tokenizer)


class SftkeyChatModel(mlflow.pyfunc.PythonModel):
    """Greedy chat generation with sftkey.generate. model_config: `max_new_tokens`, `dtype` ("auto": as stored, the
    dtype its benchmark scored it in), `temperature`, `seed`."""

    def load_context(self, context) -> None:
        import torch

        from sftkey.models import load_model, load_tokenizer

        config = context.model_config or {}
        folder = context.artifacts[WEIGHTS_ARTIFACT]
        self.tokenizer = load_tokenizer(folder)
        self.model = load_model(folder, dtype=config.get("dtype", "auto")).eval()
        if torch.cuda.is_available():
            self.model.to("cuda")
        self.config = config

    def predict(self, context, model_input: list[str | ChatRequest], params: dict[str, Any] | None = None) -> list[str]:
        from sftkey.generate import GenerationConfig, generate

        settings = self.config  # MLflow passes no params the type-hinted signature does not declare: another cap or
        # temperature is a model_config at load time (mlflow.pyfunc.load_model(uri, model_config={...}))
        prompts = [(str(i), chat_prompt(self.tokenizer, messages))
                   for i, messages in enumerate(conversations(model_input))]
        config = GenerationConfig(max_new_tokens=int(settings.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)),
                                  temperature=float(settings.get("temperature", 0.0)),
                                  seed=int(settings.get("seed", 0)), progress=False)
        return [g.output for g in generate(self.model, self.tokenizer, prompts, config)]


mlflow.models.set_model(SftkeyChatModel())
