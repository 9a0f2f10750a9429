"""A page built once and rendered twice: the report's content as sections of blocks (paragraphs, tables, figures,
examples), and one renderer each for Markdown and HTML, so that both files always carry the same content."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]

    @classmethod
    def of(cls, header: Sequence[str], rows: Sequence[Sequence[str]]) -> Table:
        width = len(header)
        for row in rows:
            if len(row) != width:
                raise ValueError(f"table row of {len(row)} cells under a header of {width}: {row!r}")
        return cls(tuple(header), tuple(tuple(row) for row in rows))


@dataclass(frozen=True)
class Figure:
    file: str  # a PNG beside the page
    alt: str


@dataclass(frozen=True)
class Example:
    """A prompt and the replies to it, by who wrote them."""

    prompt: str
    replies: tuple[tuple[str, str], ...]


Block = Paragraph | Table | Figure | Example


@dataclass(frozen=True)
class Section:
    title: str  # empty: the page's opening, under its title
    blocks: tuple[Block, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Page:
    title: str
    sections: tuple[Section, ...]

    def figures(self) -> list[str]:
        return [b.file for s in self.sections for b in s.blocks if isinstance(b, Figure)]


def _cell(text: str) -> str:
    """A Markdown table cell: a `|` in it would end the cell, a line end the row."""
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_block(block: Block) -> list[str]:
    if isinstance(block, Paragraph):
        return [block.text]
    if isinstance(block, Table):
        return [f"| {' | '.join(map(_cell, row))} |" for row in (block.header, ("---",) * len(block.header),
                                                                  *block.rows)]
    if isinstance(block, Figure):
        return [f"![{block.alt}]({block.file})"]
    return [f"**Prompt:** {block.prompt}", "", *(f"- *{who}:* {text}" for who, text in block.replies)]


def to_markdown(page: Page) -> str:
    lines = [f"# {page.title}"]
    for section in page.sections:
        if section.title:
            lines += ["", f"## {section.title}"]
        for block in section.blocks:
            lines += ["", *markdown_block(block)]
    return "\n".join(lines) + "\n"


STYLE = ("body{font-family:sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
         "table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.3rem .6rem;"
         "vertical-align:top}img{max-width:100%}")


def html_block(block: Block) -> str:
    e = html.escape
    if isinstance(block, Paragraph):
        return f"<p>{e(block.text)}</p>"
    if isinstance(block, Table):
        header = "".join(f"<th>{e(cell)}</th>" for cell in block.header)
        rows = "".join(f"<tr>{''.join(f'<td>{e(cell)}</td>' for cell in row)}</tr>" for row in block.rows)
        return f"<table><tr>{header}</tr>{rows}</table>"
    if isinstance(block, Figure):
        return f"<img src='{e(block.file)}' alt='{e(block.alt)}'>"
    replies = "".join(f"<li><i>{e(who)}:</i> {e(text)}</li>" for who, text in block.replies)
    return f"<div><p><b>Prompt:</b> {e(block.prompt)}</p><ul>{replies}</ul></div>"


def to_html(page: Page) -> str:
    e = html.escape
    body = "".join((f"<h2>{e(section.title)}</h2>" if section.title else "")
                   + "".join(html_block(block) for block in section.blocks) for section in page.sections)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{e(page.title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{e(page.title)}</h1>{body}</body></html>")
