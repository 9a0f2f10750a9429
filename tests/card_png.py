"""PNG files that carry a character card, written with the standard library (zlib + struct).

`python tests/card_png.py` rewrites `examples/cards/ada.png` from `ada.v3.json` (chunk `ccv3`) and `ada.v2.json`
(chunk `chara`), as V3 writers do; tests/test_cards.py checks the committed file is exactly that.
"""

from __future__ import annotations

import base64
import struct
import zlib
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "cards"
SIZE = 16  # pixels a side: a small square in the card's colour


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png(text: dict[str, bytes]) -> bytes:
    """A SIZE x SIZE RGB image with one tEXt chunk per (keyword, text)."""
    header = struct.pack(">IIBBBBB", SIZE, SIZE, 8, 2, 0, 0, 0)
    pixels = b"".join(b"\x00" + b"\x3b\x7d\xd8" * SIZE for _ in range(SIZE))  # filter byte, then RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + b"".join(chunk(b"tEXt", keyword.encode("latin-1") + b"\0" + value) for keyword, value in text.items())
            + chunk(b"IDAT", zlib.compress(pixels, 9)) + chunk(b"IEND", b""))


def card_png(**cards: bytes) -> bytes:
    """A PNG with each card JSON base64-encoded under its keyword, e.g. card_png(chara=v2_json)."""
    return png({keyword: base64.b64encode(data) for keyword, data in cards.items()})


def example_png() -> bytes:
    return card_png(ccv3=(EXAMPLES / "ada.v3.json").read_bytes(), chara=(EXAMPLES / "ada.v2.json").read_bytes())


if __name__ == "__main__":
    (EXAMPLES / "ada.png").write_bytes(example_png())
    print(EXAMPLES / "ada.png")
