"""The character card: who the teacher plays. YAML with name, system_prompt, style_rules, topics."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from jobs.assets import builtin
from jobs.config import IngestConfig
from jobs.errors import InputError
from jobs.inputs import load_yaml
from jobs.store import StoreSettings, fetch_source


class CharacterCard(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    system_prompt: str = Field(min_length=20)
    style_rules: list[str] = []
    topics: list[str] = []
    greeting: str = ""

    @field_validator("name", "system_prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value.strip()

    def teacher_system_prompt(self) -> str:
        """The full text the teacher gets as its system message: the prompt plus the style rules."""
        rules = "".join(f"\n- {rule}" for rule in self.style_rules)
        return self.system_prompt + (f"\n\nStyle rules:{rules}" if rules else "")


def card_bytes(ingest: IngestConfig, settings: StoreSettings) -> bytes:
    if ingest.card.startswith("builtin:"):
        return builtin(ingest.card, "cards", ".yaml")
    return fetch_source(settings, ingest.card, ingest.max_input_mb)


def parse_card(data: bytes, where: str) -> CharacterCard:
    tree = load_yaml(data, where)
    if not isinstance(tree, dict):
        raise InputError(f"{where}: a character card must be a YAML mapping")
    try:
        return CharacterCard.model_validate(tree)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        message = "is missing" if first["type"] == "missing" else first["msg"]
        raise InputError(f"{where}: card field {field} {message}") from None
