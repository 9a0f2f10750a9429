"""Report: RESULTS in Markdown and HTML with PNG plots, from every phase's figures."""

from __future__ import annotations

import html
import io
import statistics
from dataclasses import dataclass

from jobs.metrics import (
    ARROWS,
    DOLLARS,
    HEADER,
    IN_CHARACTER,
    IN_CHARACTER_LEXICAL,
    KEYS,
    KL,
    KL_CLOSED,
    NATS,
    OUT_OF_CHARACTER,
    PERSONA_SIMILARITY,
    SIMILARITY,
    TOKENS,
    Row,
    figure_rows,
    markdown_table,
)
from jobs.phases import PHASE
from jobs.phases.base import PhaseConfig, run_unit, units
from jobs.store import ArtifactStore, UnitWriter


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def plots(history: list[dict], val: list[dict], replies: list[dict], ev: dict, objective: str) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = {}
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], alpha=0.8,
            label=f"train loss, objective {objective} (per step)")
    if val:
        ax.plot([v["step"] for v in val], [v["loss"] for v in val], "o-",
                label="validation: NLL of the teacher's replies")
    ax.set(xlabel="step", ylabel="per assistant token", title="Student training")
    ax.legend()
    ax.grid(alpha=0.3)
    images["loss.png"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = [i / 20 for i in range(-4, 21)]
    base, student, resampled = (SIMILARITY.of(role) for role in ("base", "student", "teacher_resampled"))
    ax.hist([r[base] for r in replies], bins=bins, alpha=0.6, label=f"base (mean {ev[base]:.3f})")
    ax.hist([r[student] for r in replies], bins=bins, alpha=0.6, label=f"student (mean {ev[student]:.3f})")
    ax.hist([r[resampled] for r in replies], bins=bins, histtype="step", linewidth=2, color="black",
            label=f"a second teacher sample (mean {ev[resampled]:.3f})")
    ax.set(xlabel="cosine similarity to the teacher's reply", ylabel="eval prompts",
           title="Similarity to the teacher (all-MiniLM-L6-v2)")
    ax.legend(loc="upper left", fontsize="small")
    images["similarity.png"] = _png(fig)
    plt.close(fig)

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(13, 3.5))
    roles = ("base", "student", "teacher_resampled")
    bars = {"KL(teacher ‖ model) per token": (left, ["base, no card", "student, no card"],
                                              [ev[KL.of(role)] for role in ("base", "student")]),
            "judged in character (embeddings)": (middle, ["base", "student", "teacher, 2nd sample"],
                                                 [ev[IN_CHARACTER.of(role)] for role in roles]),
            "judged in character (n-grams)": (right, ["base", "student", "teacher, 2nd sample"],
                                              [ev[IN_CHARACTER_LEXICAL.of(role)] for role in roles])}
    for title, (ax, names, values) in bars.items():
        ax.bar(names, values, color=["#999999", "#3b7dd8", "#d88b3b"][:len(values)])
        for i, value in enumerate(values):
            ax.text(i, value, f"{value:.2f}", ha="center", va="bottom")
        ax.set_title(title)
    images["distillation.png"] = _png(fig)
    plt.close(fig)
    return images


@dataclass(frozen=True)
class Compared:
    """A run trained on this run's data (the same split), its objective's figures: for the comparison."""

    run_id: str
    evaluated: str  # its evaluate unit's fingerprint
    train: dict  # the train unit's metrics
    train_s: float
    figures: dict  # evaluate's metrics.json
    replies: list[dict]  # evaluate's replies.jsonl

    @property
    def name(self) -> str:
        # the train settings that tell runs of one objective apart (`train.objective_settings`; older runs lack them)
        settings = "".join(f", {key.replace('_', ' ')} {value}"
                           for key, value in self.train.get("settings", {}).items())
        return f"{self.train['objective']}, {self.train['steps']} steps{settings} ({self.run_id})"


def same_data(config: PhaseConfig) -> list[Compared]:
    """The evaluated runs in this store, this one included, whose split has this run's fingerprint: the same
    eval prompts and the same training rows, so their figures compare (the objective, steps... may differ)."""
    split = config.store.require("split")["fingerprint"]
    found = []
    for run_id in sorted(config.store.run_ids()):
        other = ArtifactStore(config.store_settings, run_id)
        split_done, train, evaluate = (other.manifest(unit) for unit in ("split", "train", "evaluate"))
        if split_done is None or train is None or evaluate is None or split_done["fingerprint"] != split:
            continue
        figures = other.read_json("evaluate", "metrics.json")
        if "objective" in train["metrics"] and KL_CLOSED.key in figures:  # older runs lack them
            found.append(Compared(run_id, evaluate["fingerprint"], train["metrics"], train["wall_s"], figures,
                                  other.read_jsonl("evaluate", "replies.jsonl")))
    return found


COMPARED = (KL_CLOSED, KL, IN_CHARACTER, IN_CHARACTER_LEXICAL, SIMILARITY, PERSONA_SIMILARITY)


def comparison_table(runs: list[Compared]) -> str:
    """One row per run: its objective's distillation figures and its training time."""
    header = ["run", *(f"{m.label}: {' / '.join(v.replace('_', ' ') for v in m.variants)}" if m.variants
                       else m.label for m in COMPARED), "train time"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        # .get: runs evaluated before a figure existed show it as missing
        cells = [" / ".join(m.unit.format(run.figures.get(key)) for key in m.keys) for m in COMPARED]
        lines.append("| " + " | ".join([run.name, *cells, f"{run.train_s:.0f} s"]) + " |")
    return "\n".join(lines)


def comparison_plot(runs: list[Compared]) -> bytes:
    import matplotlib.pyplot as plt

    panels = [(KL_CLOSED.key, "KL closed (share of the base's)"), (IN_CHARACTER.of("student"), "judged in character"),
              (SIMILARITY.of("student"), "similarity to the teacher's replies")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.8))
    names = [f"{r.train['objective']}\n{r.train['steps']} steps" for r in runs]
    for ax, (key, title) in zip(axes, panels, strict=True):
        values = [r.figures[key] or 0.0 for r in runs]
        ax.bar(range(len(runs)), values, color="#3b7dd8")
        for i, value in enumerate(values):
            ax.text(i, value, f"{value:.2f}", ha="center", va="bottom")
        ax.set_xticks(range(len(runs)), names, fontsize="small")
        ax.set_title(title, fontsize="medium")
    base = runs[0].figures
    axes[1].axhline(base[IN_CHARACTER.of("base")], color="#999999", linestyle="--", label="base")
    axes[2].axhline(base[SIMILARITY.of("base")], color="#999999", linestyle="--", label="base")
    axes[2].axhline(base[SIMILARITY.of("teacher_resampled")], color="black", label="a second teacher sample")
    axes[2].legend(fontsize="small", loc="lower right")
    fig.suptitle("Distillation objectives on the same data (held-out prompts)")
    data = _png(fig)
    plt.close(fig)
    return data


TURN_FIGURES = (IN_CHARACTER, PERSONA_SIMILARITY, OUT_OF_CHARACTER, SIMILARITY)  # turns.jsonl's columns, by label


def turns_table(turns: list[dict]) -> str:
    """Evaluate's per-turn figures of the held-out conversations: a row per turn and role."""
    header = ["turn", "role", "replies", *(m.label for m in TURN_FIGURES)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in sorted(turns, key=lambda r: (r["turn"], r["role"])):
        cells = [m.unit.format(row[m.label]) for m in TURN_FIGURES]
        lines.append("| " + " | ".join([str(row["turn"]), row["role"].replace("_", " "), str(row["replies"]),
                                        *cells]) + " |")
    return "\n".join(lines)


def turns_plot(turns: list[dict]) -> bytes:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric in zip(axes, (IN_CHARACTER, PERSONA_SIMILARITY), strict=True):
        for role in sorted({r["role"] for r in turns}):
            rows = sorted((r for r in turns if r["role"] == role), key=lambda r: r["turn"])
            ax.plot([r["turn"] for r in rows], [r[metric.label] for r in rows], "o-", label=role.replace("_", " "))
        ax.set(xlabel="turn of the conversation", title=metric.label.split(" (")[0])
        ax.set_xticks(sorted({r["turn"] for r in turns}))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle("Held-out conversations, turn by turn (each turn after the recorded ones before it)")
    data = _png(fig)
    plt.close(fig)
    return data


def comparison_examples(runs: list[Compared], count: int = 3) -> list[dict]:
    """The first held-out prompts with the teacher's, the base's and every run's student reply."""
    first = runs[0].replies[:count]
    return [{"prompt": row["prompt"], "teacher": row["teacher"], "base": row["base"],
             **{run.name: run.replies[i]["student"] for run in runs}} for i, row in enumerate(first)]


def train_loss(train: dict) -> Row:
    """The first row of both the report's figure table and the model card's."""
    return Row("train loss, first → last step", f"{NATS.format(train['first_loss'])} → "
               f"{NATS.format(train['last_loss'])} ({train['steps']} steps)", NATS.name, ARROWS["lower"])


def cache_row(ev: dict) -> Row:
    """Which of evaluate's figures it read from its cache: made by an earlier run on the same data, model and card
    (`jobs.evaluation.cache`; runs evaluated before the cache existed computed every figure)."""
    cached = ev.get("cached_figures", [])
    value = f"{len(cached)} of {len(KEYS)}: {', '.join(cached)}" if cached else "none: every one computed in this run"
    return Row("figures from evaluate's cache (an earlier run on this data)", value)


def figures(train: dict, ev: dict, audit: dict) -> list[Row]:
    """Training's figures, evaluate's figure table (`jobs.metrics`), and what the audit kept."""
    down = "down" if train["last_loss_mean"] < train["first_loss_mean"] else "NOT down"
    return [
        train_loss(train),
        Row("train loss, mean of first → last steps", f"{NATS.format(train['first_loss_mean'])} → "
            f"{NATS.format(train['last_loss_mean'])} ({down})", NATS.name, ARROWS["lower"]),
        Row("validation loss, last", NATS.format(train.get("val_loss_last")), NATS.name, ARROWS["lower"]),
        *figure_rows(ev),
        cache_row(ev),
        Row("training rows kept by the audit", f"{audit['kept']} of {audit['rows_in']} ({audit['trimmed']} trimmed to"
                                               " whole sentences)", "rows"),
    ]


def usage(config: PhaseConfig) -> tuple[dict[str, int], float]:
    """Tokens the run sent to a model, as Tinker bills them (cached teacher replies cost nothing), and their
    price at `tinker.prices`."""
    store, prices = config.store, config.pipeline.tinker.prices
    metrics = [store.require(unit)["metrics"] for unit in (*units(config.store, "teacher"), "evaluate")]
    tokens = {kind: sum(m.get(kind, 0) for m in metrics) for kind in ("prefill_tokens", "sample_tokens")}
    tokens["train_tokens"] = store.require("train")["metrics"]["train_tokens"]
    dollars = (tokens["prefill_tokens"] * prices.prefill_per_mtok + tokens["sample_tokens"] * prices.sample_per_mtok
               + tokens["train_tokens"] * prices.train_per_mtok) / 1e6
    return tokens, dollars


def card_and_prompts(profile: dict) -> list[tuple[str, str]]:
    """Ingest's figures: the card's format and field mapping, its size, and where the prompts came from."""
    card, synthesis = profile["card"], profile.get("synthesis")
    rows = [("card", f"{card['source']} ({card['format']})"),
            *((f"card field {source}", target) for source, target in card["mapping"].items()),
            ("teacher system prompt", f"{card['system_prompt_chars']} characters, about "
                                      f"{card['system_prompt_tokens']} tokens, {card['tokens_counted_by']}"),
            ("prompts", f"{profile['rows_kept']} from {profile['source']} ({profile['rows_read']} read; the "
                        f"profile needs at least {profile['needed']})")]
    if synthesis:
        settings = ", ".join(f"{k}={v}" for k, v in synthesis["settings"].items())
        counts = {key: ", ".join(f"{k} {v}" for k, v in synthesis[key].items()) or "none"
                  for key in ("kinds", "topics", "refused")}
        rows += [("synthesized prompts", f"{synthesis['written']} of {synthesis['asked']} asked, "
                                         f"{synthesis['rounds']} rounds, {synthesis['wall_s']:.0f}s ({settings})"),
                 ("synthesized, by kind", counts["kinds"]),
                 ("synthesized, by card topic", counts["topics"]),
                 ("card topics without a synthesized prompt", ", ".join(synthesis["topics_missing"]) or "none"),
                 ("synthesis candidates refused", counts["refused"])]
    return rows


def render_markdown(title: str, rows: list[Row], times: list[tuple[str, float]], samples: list[dict],
                    notes: str, ingest: list[tuple[str, str]], compared: list[Compared], turns: list[dict]) -> str:
    lines = [f"# {title}", "", notes, "", markdown_table(rows)]
    if turns:
        lines += ["", "## Conversations, turn by turn", "", turns_table(turns), "", "![turns](turns.png)"]
    if len(compared) > 1:
        lines += ["", "## Objectives compared on the same data", "", comparison_table(compared), "",
                  "![objectives](objectives.png)", ""]
        for example in comparison_examples(compared):
            lines += [f"**Prompt:** {example.pop('prompt')}", ""] + [f"- *{k}:* {v}" for k, v in example.items()]
            lines += [""]
    lines += ["", "## Card and prompts", "", "| what | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in ingest]
    lines += ["", "![loss](loss.png)", "", "![similarity](similarity.png)", "", "![distillation](distillation.png)", "",
              "## Phase wall times", "", "| unit | seconds |", "|---|---|"]
    lines += [f"| {unit} | {sec:.1f} |" for unit, sec in times]
    lines += ["", "## Samples (held-out prompts)", ""]
    for s in samples:
        lines += [f"**Prompt:** {s['prompt']}", "", f"- *teacher:* {s['teacher']}", f"- *student:* {s['student']}",
                  f"- *base:* {s['base']}", ""]
    return "\n".join(lines) + "\n"


def _html_table(markdown: str) -> str:
    """A Markdown table (header, rule, rows) as an HTML table."""
    lines = markdown.splitlines()
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[:1] + lines[2:]]
    return "<table>" + "".join(f"<tr>{''.join(f'<td>{html.escape(c)}</td>' for c in row)}</tr>" for row in rows) \
        + "</table>"


def render_html(title: str, rows: list[Row], times: list[tuple[str, float]], samples: list[dict],
                notes: str, ingest: list[tuple[str, str]], compared: list[Compared], turns: list[dict]) -> str:
    e = html.escape
    sections = ""
    if turns:
        sections += (f"<h2>Conversations, turn by turn</h2>{_html_table(turns_table(turns))}"
                       "<img src='turns.png' alt='figures by turn'>")
    if len(compared) > 1:
        sections += (f"<h2>Objectives compared on the same data</h2>{_html_table(comparison_table(compared))}"
                       "<img src='objectives.png' alt='objectives compared'>"
                      + "".join(f"<div class='s'><p><b>Prompt:</b> {e(x.pop('prompt'))}</p><ul>"
                                + "".join(f"<li><i>{e(k)}:</i> {e(v)}</li>" for k, v in x.items()) + "</ul></div>"
                                for x in comparison_examples(compared)))
    table = "".join(f"<tr>{''.join(f'<{tag}>{e(cell)}</{tag}>' for cell in row)}</tr>"
                    for tag, row in [("th", HEADER), *(("td", row) for row in rows)])
    card = "".join(f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in ingest)
    timing = "".join(f"<tr><td>{e(u)}</td><td>{s:.1f}</td></tr>" for u, s in times)
    sample_html = "".join(
        f"<div class='s'><p><b>Prompt:</b> {e(s['prompt'])}</p><table><tr><th>teacher</th><th>student</th>"
        f"<th>base</th></tr><tr><td>{e(s['teacher'])}</td><td>{e(s['student'])}</td><td>{e(s['base'])}</td></tr>"
        f"</table></div>" for s in samples)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>"
            "body{font-family:sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
            "table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.3rem .6rem;"
            "vertical-align:top}img{max-width:100%}.s td{width:33%}</style></head><body>"
            f"<h1>{e(title)}</h1><p>{e(notes)}</p><table>{table}</table>{sections}"
            f"<h2>Card and prompts</h2><table>{card}</table>"
            "<img src='loss.png' alt='loss curve'><img src='similarity.png' alt='similarity histograms'>"
            f"<img src='distillation.png' alt='KL and judge bars'><h2>Phase wall times</h2><table>{timing}</table>"
            f"<h2>Samples (held-out prompts)</h2>{sample_html}</body></html>")


def build(config: PhaseConfig, out: UnitWriter, compared: list[Compared]) -> None:
    store = config.store
    train = store.require("train")["metrics"]
    ev = store.read_json("evaluate", "metrics.json")
    audit = store.read_json("audit", "audit.json")
    replies = store.read_jsonl("evaluate", "replies.jsonl")
    history, val = store.read_jsonl("train", "metrics.jsonl"), store.read_jsonl("train", "val.jsonl")
    card = store.read_json("ingest", "card.json")
    times = [(unit, store.require(unit)["wall_s"]) for phase in PHASE["report"].reads for unit in units(store, phase)]
    title = f"Distilling {card['name']}: run {config.run_id}"
    prices = ev["prices_per_mtok"]
    notes = (f"Profile {config.pipeline.profile}, base model {config.pipeline.model.base}, "
             f"{train['train_rows']} training rows, {train['steps']} steps, {ev['eval_prompts']} held-out eval "
             f"prompts. Prices: ${prices['input_per_mtok']}/M input, ${prices['output_per_mtok']}/M output tokens; "
             "the cost ratio uses the teacher's reply length for both sides.")
    tokens, dollars = usage(config)
    on_tinker = "" if train["backend"] == "tinker" else " if run on Tinker"
    rows = figures(train, ev, audit) + [
        Row("tokens: prefill / sample / train", " / ".join(map(TOKENS.format, tokens.values())), TOKENS.name),
        Row(f"cost of this run{on_tinker}, at tinker.prices", DOLLARS.format(dollars), DOLLARS.name)]
    samples = sorted(replies, key=lambda r: -r[SIMILARITY.of("student")])[:3] + replies[:2]
    for name, data in plots(history, val, replies, ev, train["objective"]).items():
        out.write_bytes(name, data)
    if len(compared) > 1:
        out.write_bytes("objectives.png", comparison_plot(compared))
    turns = store.read_jsonl("evaluate", "turns.jsonl")
    if turns:
        out.write_bytes("turns.png", turns_plot(turns))
    ingest = card_and_prompts(store.read_json("ingest", "profile.json"))
    page = (title, rows, times, samples, notes, ingest, compared, turns)
    out.write_bytes("report.md", render_markdown(*page).encode())
    out.write_bytes("report.html", render_html(*page).encode())
    out.metrics.update({"loss_decreased": train["last_loss_mean"] < train["first_loss_mean"],
                        **tokens, "tinker_cost_usd": round(dollars, 6),
                        "similarity_median_student": statistics.median(r[SIMILARITY.of("student")] for r in replies)})


def main(config: PhaseConfig) -> dict:
    compared = same_data(config)
    # a run evaluated later on the same data redoes this report, so that its comparison includes that run
    return run_unit(config, "report", lambda out: build(config, out, compared),
                    extra_key=[(run.run_id, run.evaluated) for run in compared])
