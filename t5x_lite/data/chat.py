"""Chat templates: conversations (``messages`` records) as supervised (input, target) pairs.

Each assistant turn of a conversation ``[{"role": ..., "content": ...}, ...]`` becomes a pair
(everything before that turn, rendered with the generation prompt; the turn itself), or only the
last one (``data.chat_turns=last``), each rendered by the model's own Jinja chat template (``import-hf`` keeps it as ``chat_template.json``
in the work dir and sets ``data.chat_template``). The pipeline adds BOS before an input and EOS
after a target, so a leading BOS and a trailing EOS of the template's text are left to it.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Optional

from t5x_lite.data import DataError

CHAT_FILE = "chat_template.json"  # {"template": str, "bos_token": str, "eos_token": str}


def _token_text(value) -> str:
    """A tokenizer_config.json special token: a string, or a dict with its ``content``."""
    if isinstance(value, dict):
        return value.get("content") or ""
    return value or ""


def from_hf(path: str) -> Optional[dict]:
    """The chat template of a Hugging Face model directory (``chat_template.jinja``, or the
    ``chat_template`` of ``tokenizer_config.json``: a string, or named ones of which ``default``),
    with its BOS / EOS texts; None when it has none."""
    config_path = os.path.join(path, "tokenizer_config.json")
    config = {}
    if os.path.exists(config_path):
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    jinja_path = os.path.join(path, "chat_template.jinja")
    if os.path.exists(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            template = f.read()
    if not isinstance(template, str) or not template.strip():
        return None
    return {"template": template, "bos_token": _token_text(config.get("bos_token")),
            "eos_token": _token_text(config.get("eos_token"))}


def load(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            chat = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"data.chat_template={path!r} cannot be read ({e})") from None
    if not isinstance(chat, dict) or not isinstance(chat.get("template"), str):
        raise DataError(f"data.chat_template={path!r} is not a chat template file ({CHAT_FILE} as import-hf writes)")
    return chat


def _environment():
    try:
        import jinja2
    except ImportError:
        raise DataError("chat templates need jinja2: pip install -e '.[hf]'") from None
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # templates from the Hub are untrusted code

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    return env


def render(chat: dict, messages: list, add_generation_prompt: bool) -> str:
    template = chat.get("_compiled")
    if template is None:
        template = chat["_compiled"] = _environment().from_string(chat["template"])
    return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                           bos_token=chat.get("bos_token", ""), eos_token=chat.get("eos_token", ""))


def prompt_text(chat: dict, messages: list) -> str:
    """A conversation rendered with the generation prompt (the assistant's turn to speak), less
    a leading BOS (the pipeline and the decoder add it)."""
    prompt = render(chat, messages, add_generation_prompt=True)
    bos = chat.get("bos_token", "")
    return prompt[len(bos):] if bos and prompt.startswith(bos) else prompt


def _check_messages(messages) -> None:
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)):
        raise ValueError("messages not a list of {role, content}")


def _turn_pair(chat: dict, messages: list, turn: int) -> tuple[str, str]:
    """(input, target) of assistant turn ``turn``: the conversation before it, rendered with the
    generation prompt; the turn as the template renders it after that prompt."""
    prompt = render(chat, messages[:turn], add_generation_prompt=True)
    full = render(chat, messages[:turn + 1], add_generation_prompt=False)
    if not full.startswith(prompt):
        raise ValueError("conversations whose rendering does not start with their prompt")
    target = full[len(prompt):].rstrip()
    eos = chat.get("eos_token", "")
    if eos and target.endswith(eos):
        target = target[: -len(eos)]
    return prompt_text(chat, messages[:turn]), target


def as_pair(chat: dict, messages) -> tuple[str, str]:
    """(input, target) of a conversation whose last turn is the assistant's. Raises ValueError
    (the reason a record is skipped) otherwise, or when the template does not render the
    conversation's start as the prompt of its last turn."""
    return as_pairs(chat, messages, "last")[0]


def as_pairs(chat: dict, messages, turns: str = "all") -> list[tuple[str, str]]:
    """The (input, target) pairs of a conversation: ``turns="all"``, one per assistant turn, its
    input the whole conversation before that turn (each rendered as if the turn were the last:
    templates that render earlier turns differently, such as Qwen3's dropping of past
    reasoning, get what they would see when generating it); ``"last"``, its final turn alone,
    which must be the assistant's. Raises ValueError (the reason a record is skipped)."""
    _check_messages(messages)
    if turns == "last":
        if messages[-1].get("role") != "assistant":
            raise ValueError("conversations not ending with an assistant turn")
        return [_turn_pair(chat, messages, len(messages) - 1)]
    at = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if not at:
        raise ValueError("conversations without an assistant turn")
    return [_turn_pair(chat, messages, i) for i in at]
