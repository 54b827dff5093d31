"""Prompt text -> token ids: the one place that applies a chat template."""

from __future__ import annotations

from .errors import SpdError


def template_ids(tok, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of `messages` through the tokenizer's chat template."""
    return list(tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                        return_dict=True)["input_ids"])


def encode_prompt(tok, prompt: str, chat: bool | None = None) -> list[int]:
    """A user prompt's ids. chat=True: as the user turn of a chat, ready for the answer (an error if
    the model has no template); False: the plain text; None: chat when the model has a template
    (how bench and eval-draft encode the first turn of a prompt set)."""
    if not prompt.strip():
        raise SpdError("the prompt is empty")
    if chat is None:
        chat = bool(tok.chat_template)
    if chat:
        if not tok.chat_template:
            raise SpdError("this model has no chat template; drop --chat")
        return template_ids(tok, [{"role": "user", "content": prompt}], add_generation_prompt=True)
    return list(tok(prompt).input_ids)
