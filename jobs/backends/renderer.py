"""Chat rendering: one convention for teacher, student and token counts.

The teacher gets the card as its system message. The student and the base model get *no* system message,
which means SmolLM2's chat template inserts its default system line; that line is part of the student's
prompt in training, evaluation and token accounting alike, so every figure counts what is really sent.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Renderer:
    tokenizer: object  # a transformers tokenizer with a chat template

    @property
    def end_of_turn(self) -> int:
        return self.tokenizer.eos_token_id

    def prompt(self, user: str, system: str | None = None) -> list[int]:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False))

    def reply(self, text: str) -> list[int]:
        """The assistant turn as the model should produce it: the text, then the end-of-turn token."""
        return self.tokenizer.encode(text, add_special_tokens=False) + [self.end_of_turn]

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))
