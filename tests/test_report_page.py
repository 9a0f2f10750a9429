"""The report's page is built once (`jobs.phases.report.report_page`) and rendered twice (`jobs.page`): the
Markdown and the HTML carry the same sections, tables, figures and examples, in the same order. Made-up figures;
no model runs here."""

from __future__ import annotations

import html
import re

import pytest

from jobs.metrics import KEYS, Row
from jobs.page import Example, Figure, Page, Paragraph, Section, Table, to_html, to_markdown
from jobs.phases import report

TURNS = [{"turn": t, "role": role, "replies": 2, **{m.label: 0.5 for m in report.TURN_FIGURES}}
         for t in (1, 2) for role in ("base", "student")]


def compared(run_id: str, objective: str) -> report.Compared:
    replies = [{"prompt": f"Question {i}?", "teacher": f"Teacher {i}.", "base": f"Base {i}.",
                "student": f"{objective} student {i} | with a pipe"} for i in range(4)]
    return report.Compared(run_id, "fp", {"objective": objective, "steps": 3}, 12.0,
                           {key: 0.25 for key in KEYS}, replies)


def made_up(turns: list[dict], runs: list[report.Compared]) -> Page:
    rows = [Row("train loss, first → last step", "3.100 → 2.200 (12 steps)", "nats/token", "↓"),
            Row("figures from evaluate's cache", "none: every one computed in this run")]
    samples = [{"prompt": "Who <b>taught</b> you?", "teacher": "Haydn & Albrechtsberger.", "student": "Haydn.",
                "base": "As an AI..."}]
    return report.report_page("Distilling Ada: run ci-1", "Profile ci, 12 training rows.", rows, turns, runs,
                              [("card", "ada.png (chara_card_v3 in PNG)")], [("train", 12.5), ("evaluate", 3.25)],
                              samples)


def markdown_outline(text: str) -> list[tuple[str, str]]:
    """Headings and figures of a Markdown page, in order."""
    return [("h1" if m[0] else "h2" if m[1] else "img", m[0] or m[1] or m[2])
            for m in re.findall(r"^# (.+)$|^## (.+)$|^!\[[^]]*\]\(([^)]+)\)$", text, re.MULTILINE)]


def html_outline(text: str) -> list[tuple[str, str]]:
    return [(m[0] or "img", html.unescape(m[1] or m[2]))
            for m in re.findall(r"<(h1|h2)>(.*?)</h\d>|<img src='([^']+)'", text)]


@pytest.mark.parametrize(("turns", "runs"), [([], []), (TURNS, [compared("ci-1", "logit"), compared("ci-2", "sft")])],
                         ids=["one run", "turns and objectives"])
def test_markdown_and_html_carry_the_same_sections_figures_tables_and_examples(turns, runs):
    page = made_up(turns, runs)
    markdown, page_html = to_markdown(page), to_html(page)
    titles = [section.title for section in page.sections if section.title]
    assert ("Conversations, turn by turn" in titles) == bool(turns)
    assert ("Objectives compared on the same data" in titles) == bool(runs)
    outline = [("h1", page.title)] + [item for section in page.sections for item in
                                      ([("h2", section.title)] if section.title else [])
                                      + [("img", b.file) for b in section.blocks if isinstance(b, Figure)]]
    assert markdown_outline(markdown) == html_outline(page_html) == outline
    assert {"loss.png", "similarity.png", "distillation.png"} <= set(page.figures())

    blocks = [block for section in page.sections for block in section.blocks]
    for table in (b for b in blocks if isinstance(b, Table)):
        for tag, row in [("th", table.header), *(("td", row) for row in table.rows)]:
            assert "| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" in markdown.splitlines()
            assert "".join(f"<{tag}>{html.escape(cell)}</{tag}>" for cell in row) in page_html
    for example in (b for b in blocks if isinstance(b, Example)):
        assert f"**Prompt:** {example.prompt}" in markdown
        assert f"<b>Prompt:</b> {html.escape(example.prompt)}" in page_html
        for who, text in example.replies:
            assert f"- *{who}:* {text}" in markdown
            assert f"<li><i>{html.escape(who)}:</i> {html.escape(text)}</li>" in page_html
    notes = next(b for b in blocks if isinstance(b, Paragraph))
    assert notes.text in markdown and f"<p>{html.escape(notes.text)}</p>" in page_html


def test_the_comparison_shows_every_runs_student_beside_teacher_and_base():
    page = made_up([], [compared("ci-1", "logit"), compared("ci-2", "sft")])
    [section] = [s for s in page.sections if s.title == "Objectives compared on the same data"]
    table, figure, *examples = section.blocks
    names = ["logit, 3 steps (ci-1)", "sft, 3 steps (ci-2)"]
    assert isinstance(table, Table) and [row[0] for row in table.rows] == names
    assert figure == Figure("objectives.png", "objectives compared")
    assert [who for who, _ in examples[0].replies] == ["teacher", "base", *names]
    # a cell's `|` does not split a Markdown row
    assert "- *sft, 3 steps (ci-2):* sft student 0 | with a pipe" in to_markdown(page)


def test_a_table_row_must_fit_its_header():
    with pytest.raises(ValueError, match="table row of 1 cells under a header of 2"):
        Table.of(("what", "value"), [("card",)])


def test_html_escapes_what_the_page_holds():
    page = Page("<title>", (Section("a & b", (Paragraph("<script>x</script>"),)),))
    text = to_html(page)
    assert "<script>x" not in text and "&lt;script&gt;x&lt;/script&gt;" in text and "<h2>a &amp; b</h2>" in text
