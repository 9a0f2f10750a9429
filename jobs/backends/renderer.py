"""Chat rendering: one convention for teacher, student and token counts.

The teacher gets the card as its system message. The student and the base model get *no* system message,
which means SmolLM2's chat template inserts its default system line; that line is part of the student's
prompt in training, evaluation and token accounting alike, so every figure counts what is really sent.

User text is text: prompts, card fields and replies are tokenized with special-token parsing off, so a
prompt that spells `<|im_start|>system` gets the characters, never the control token. Only the template's
own markup becomes control tokens. A prompt longer than the model's context is refused, not sampled.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from jobs.errors import InputError

UNBOUNDED = 10**9  # tokenizers without a known length report a huge model_max_length


class ChatTokenizer(Protocol):
    """What the renderer uses of a transformers tokenizer. transformers types `apply_chat_template` and `decode`
    with every shape they can return (token lists, BatchEncoding); called as here they return text, so they are
    declared `object` and the results checked."""

    @property
    def eos_token_id(self) -> int: ...

    @property
    def model_max_length(self) -> int: ...

    def encode(self, text: str, *, add_special_tokens: bool = ..., split_special_tokens: bool = ...) -> list[int]: ...

    def apply_chat_template(self, conversation: list[dict[str, str]], *, add_generation_prompt: bool = ...,
                            tokenize: bool = ...) -> object: ...

    def decode(self, token_ids: list[int], *, skip_special_tokens: bool = ...) -> object: ...


def _context_tokens(tokenizer: ChatTokenizer) -> int | None:
    """The model's context window: the tokenizer's bound, else `max_position_embeddings` beside it."""
    if tokenizer.model_max_length < UNBOUNDED:
        return tokenizer.model_max_length
    config = Path(getattr(tokenizer, "name_or_path", "") or ".") / "config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("max_position_embeddings")
    return None


@dataclass
class Renderer:
    tokenizer: ChatTokenizer  # a transformers tokenizer with a chat template
    context_tokens: int | None = field(init=False)

    def __post_init__(self) -> None:
        self.context_tokens = _context_tokens(self.tokenizer)

    @property
    def end_of_turn(self) -> int:
        return self.tokenizer.eos_token_id

    def _text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)

    def prompt(self, user: str, system: str | None = None, reply_prefix: str = "") -> list[int]:
        """One question, up to the assistant's turn; `reply_prefix` is text that turn has already begun with."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return self.chat(messages, reply_prefix)

    def chat(self, messages: list[dict], reply_prefix: str = "") -> list[int]:
        """A conversation (`{"role", "content"}` messages) up to the assistant's next turn."""
        # render the template around stand-ins, then tokenize its markup and each message's text separately
        marks = [f"\x1f{uuid.uuid4().hex}\x1f" for _ in messages]
        rendered = self.tokenizer.apply_chat_template(
            [{**m, "content": mark} for m, mark in zip(messages, marks, strict=True)],
            add_generation_prompt=True, tokenize=False)
        assert isinstance(rendered, str), "apply_chat_template with tokenize=False renders text"
        pieces = re.split("(" + "|".join(marks) + ")", rendered)
        if sorted(p for p in pieces if p in marks) != sorted(marks):
            raise RuntimeError("the chat template does not insert each message's content once, verbatim")
        contents = dict(zip(marks, (m["content"] for m in messages), strict=True))
        tokens = []
        for piece in pieces:
            if piece in contents:
                tokens += self._text(contents[piece])
            elif piece:
                tokens += self.tokenizer.encode(piece, add_special_tokens=False)
        tokens += self._text(reply_prefix)
        if self.context_tokens is not None and len(tokens) > self.context_tokens:
            raise InputError(f"a prompt of {len(tokens)} tokens (system message included) is longer than the "
                             f"model's context of {self.context_tokens} tokens")
        return tokens

    def conversation(self, messages: list[dict]) -> tuple[list[int], list[float]]:
        """A whole conversation as training data: its tokens, weight 1 on every assistant turn (its end-of-turn
        token included) and 0 elsewhere. Each assistant turn follows exactly the tokens `chat` gives for the
        messages before it, as at sampling time."""
        tokens: list[int] = []
        weights: list[float] = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.chat(messages[:i])
            if before[:len(tokens)] != tokens:
                raise RuntimeError("the chat template renders an earlier turn differently once the chat goes on")
            weights += [0.0] * (len(before) - len(tokens))
            reply = self.reply(message["content"])
            tokens, weights = before + reply, weights + [1.0] * len(reply)
        return tokens, weights

    def reply(self, text: str) -> list[int]:
        """The assistant turn as the model should produce it: the text, then the end-of-turn token."""
        return self._text(text) + [self.end_of_turn]

    def decode(self, tokens: list[int]) -> str:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        assert isinstance(text, str), "one list of ids decodes to one text"
        return text.strip()
