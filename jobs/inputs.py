"""Reading what users hand in: a size cap before anything is read whole, UTF-8 (a byte-order mark is fine,
an invalid byte is refused with its line), YAML errors with line and column, and token estimates.
"""

from __future__ import annotations

import math
import stat
from pathlib import Path

import yaml

from jobs.errors import InputError

MB = 1 << 20
# ingest's bound for text it cannot tokenize (its image has no tokenizer): 2 UTF-8 bytes per token. It
# over-counts English (4.2 bytes per SmolLM2 token), German (3.0) and Russian (2.1) and under-counts only
# Chinese (1.85), emoji (1.3) and digit runs (1.0); the teacher counts exactly and refuses what ingest let by.
BYTES_PER_TOKEN = 2.0


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text.encode()) / BYTES_PER_TOKEN)


def too_big(where: str, size: int | None, limit: int) -> InputError:
    """`size` None: the source never said, and reading stopped at the cap."""
    shown = f"{size / MB:.1f} MB" if size is not None else f"more than {limit // MB} MB"
    return InputError(f"{where}: {shown}, over the {limit // MB} MB input cap (ingest.max_input_mb)")


def read_capped(path: str, limit: int) -> bytes:
    """A local file's bytes, refused once it passes `limit` (a device like /dev/zero never ends)."""
    try:
        info = Path(path).stat()
        if stat.S_ISREG(info.st_mode) and info.st_size > limit:
            raise too_big(path, info.st_size, limit)
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    if len(data) > limit:
        raise too_big(path, None, limit)
    return data


def decode_text(data: bytes, where: str) -> str:
    """UTF-8 text, with or without a byte-order mark; an invalid byte is refused with its line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise InputError(f"{where}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at column {column})") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(data: bytes | str, where: str):
    text = decode_text(data, where) if isinstance(data, bytes) else data
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark  # PyYAML raises some errors with neither mark set
        at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise InputError(f"{where}{at}: not valid YAML ({exc.problem})") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{where}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except RecursionError:
        raise InputError(f"{where}: not valid YAML (nested too deeply)") from None
