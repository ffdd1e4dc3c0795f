"""Chat messages to prompt token ids through the tokenizer's chat template.

A tokenizer without a chat template (the bundled spear-ref-16m is a base model and has none) uses
``FALLBACK_CHAT_TEMPLATE``: each message as ``<|role|>`` on a line, its content, and the EOS token, then
``<|assistant|>`` on a line for the reply; the BOS token first. The model was not trained on it, so a base model's
chat replies are only as good as its continuation of that text.
"""
from __future__ import annotations

from .protocol import APIError, ChatMessage

FALLBACK_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def message_text(message: ChatMessage, index: int) -> str:
    """A message's content as text: a string, or OpenAI content parts of type ``text`` joined."""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for part in message.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(f"messages[{index}].content: only text parts are supported, got {part.get('type')!r}",
                           param=f"messages.{index}.content", code="unsupported_value")
        texts.append(part["text"])
    return "\n".join(texts)


def chat_prompt_ids(tokenizer, messages: list[ChatMessage]) -> list[int]:
    """Render ``messages`` with the chat template (``add_generation_prompt``) and tokenize without adding special
    tokens again (the template writes BOS itself)."""
    conversation = [{"role": m.role, "content": message_text(m, i)} for i, m in enumerate(messages)]
    template = getattr(tokenizer, "chat_template", None) or FALLBACK_CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(conversation, chat_template=template, add_generation_prompt=True,
                                         tokenize=False)
    return list(tokenizer.encode(text, add_special_tokens=False))
