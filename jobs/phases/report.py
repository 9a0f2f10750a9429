"""Report: one page of every phase's figures (`report_page`), rendered to Markdown and HTML (`jobs.page`), with
PNG plots beside it."""

from __future__ import annotations

import io
import statistics
from collections import Counter
from dataclasses import dataclass

from jobs.backends import BACKENDS
from jobs.lorebook import Lorebook
from jobs.metrics import (
    ARROWS,
    DOLLARS,
    HEADER,
    HOLDS_ROLE,
    IDENTITY,
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
)
from jobs.page import Example, Figure, Page, Paragraph, Section, Table, to_html, to_markdown
from jobs.phases import PHASE
from jobs.phases.base import PhaseConfig, run_unit, units
from jobs.store import ArtifactStore, UnitWriter
from jobs.trained import train_loss  # the first row of both the report's figure table and the model card's


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


# the objective's distillation figures, and what the persona checks ask of it (who it is, holding the role)
COMPARED = (KL_CLOSED, KL, IN_CHARACTER, IN_CHARACTER_LEXICAL, SIMILARITY, PERSONA_SIMILARITY, IDENTITY, HOLDS_ROLE)


def comparison_table(runs: list[Compared]) -> Table:
    """One row per run: its objective's distillation figures and its training time."""
    header = ["run", *(f"{m.label}: {' / '.join(v.replace('_', ' ') for v in m.variants)}" if m.variants
                       else m.label for m in COMPARED), "train time"]
    # .get: runs evaluated before a figure existed show it as missing
    return Table.of(header, [[run.name, *(" / ".join(m.unit.format(run.figures.get(key)) for key in m.keys)
                                          for m in COMPARED), f"{run.train_s:.0f} s"] for run in runs])


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


def turns_table(turns: list[dict]) -> Table:
    """Evaluate's per-turn figures of the held-out conversations: a row per turn and role."""
    header = ["turn", "role", "replies", *(m.label for m in TURN_FIGURES)]
    return Table.of(header, [[str(row["turn"]), row["role"].replace("_", " "), str(row["replies"]),
                              *(m.unit.format(row[m.label]) for m in TURN_FIGURES)]
                             for row in sorted(turns, key=lambda r: (r["turn"], r["role"]))])


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


def comparison_examples(runs: list[Compared], count: int = 3) -> list[Example]:
    """The first held-out prompts with the teacher's, the base's and every run's student reply."""
    return [Example(row["prompt"], (("teacher", row["teacher"]), ("base", row["base"]),
                                    *((run.name, run.replies[i]["student"]) for run in runs)))
            for i, row in enumerate(runs[0].replies[:count])]


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


def lorebook_rows(card: dict, teacher: list[dict]) -> list[tuple[str, str]]:
    """The card's lorebook entries (none without one): where each goes, and for a keyed one the teacher prompts it
    was in, over every teacher shard's `lorebook_fired`."""
    if not card.get("lorebook"):
        return []
    book = Lorebook.model_validate(card["lorebook"])
    fired: Counter[str] = Counter()
    for metrics in teacher:
        fired.update(metrics.get("lorebook_fired", {}))
    prompts = sum(m["rows"] + m["followups"] for m in teacher)
    constants, keyed = book.constants(), book.keyed()
    rows = []
    for entry in book.entries:
        place = entry.position.replace("_char", " the card")
        if entry in constants:
            used = f"constant, {place}: in every teacher prompt"
        elif entry in keyed:
            keys = ", ".join(entry.keys) + (f" with one of {', '.join(entry.secondary_keys)}" if entry.selective
                                            and entry.secondary_keys else "")
            used = f"keyed ({keys}): in {fired[entry.label]} of {prompts} teacher prompts"
        else:
            used = "not used (" + ("disabled" if not entry.enabled else "empty" if not entry.text
                                   else "over the budget") + ")"
        rows.append((f"lorebook entry {entry.label}", used))
    return rows


def report_page(title: str, notes: str, rows: list[Row], turns: list[dict], compared: list[Compared],
                ingest: list[tuple[str, str]], times: list[tuple[str, float]], samples: list[dict]) -> Page:
    """The report's content, once: what `report.md` and `report.html` both render."""
    sections = [Section("", (Paragraph(notes), Table.of(HEADER, rows)))]
    if turns:
        sections.append(Section("Conversations, turn by turn", (turns_table(turns),
                                                                 Figure("turns.png", "figures by turn"))))
    if len(compared) > 1:
        sections.append(Section("Objectives compared on the same data",
                                (comparison_table(compared), Figure("objectives.png", "objectives compared"),
                                 *comparison_examples(compared))))
    return Page(title, (
        *sections,
        Section("Card and prompts", (Table.of(("what", "value"), ingest),)),
        Section("Training and held-out figures", (Figure("loss.png", "loss curve"),
                                                  Figure("similarity.png", "similarity histograms"),
                                                  Figure("distillation.png", "KL and judge bars"))),
        Section("Phase wall times", (Table.of(("unit", "seconds"), [(unit, f"{s:.1f}") for unit, s in times]),)),
        Section("Samples (held-out prompts)", tuple(
            Example(s["prompt"], tuple((role, s[role]) for role in ("teacher", "student", "base"))) for s in samples))))


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
    on_tinker = "" if BACKENDS.get(train["backend"]).billed else " if run on Tinker"
    rows = figures(train, ev, audit) + [
        Row("tokens: prefill / sample / train", " / ".join(map(TOKENS.format, tokens.values())), TOKENS.name),
        Row(f"cost of this run{on_tinker}, at tinker.prices", DOLLARS.format(dollars), DOLLARS.name)]
    samples = sorted(replies, key=lambda r: -r[SIMILARITY.of("student")])[:3] + replies[:2]
    turns = store.read_jsonl("evaluate", "turns.jsonl")
    ingest = card_and_prompts(store.read_json("ingest", "profile.json")) + lorebook_rows(
        card, [store.require(unit)["metrics"] for unit in units(store, "teacher")])
    page = report_page(title, notes, rows, turns, compared, ingest, times, samples)
    images = plots(history, val, replies, ev, train["objective"])
    if len(compared) > 1:
        images["objectives.png"] = comparison_plot(compared)
    if turns:
        images["turns.png"] = turns_plot(turns)
    for name in page.figures():  # exactly the plots the page shows
        out.write_bytes(name, images[name])
    out.write_bytes("report.md", to_markdown(page).encode())
    out.write_bytes("report.html", to_html(page).encode())
    out.metrics.update({"loss_decreased": train["last_loss_mean"] < train["first_loss_mean"],
                        **tokens, "tinker_cost_usd": round(dollars, 6),
                        "similarity_median_student": statistics.median(r[SIMILARITY.of("student")] for r in replies)})


def main(config: PhaseConfig) -> dict:
    compared = same_data(config)
    # a run evaluated later on the same data redoes this report, so that its comparison includes that run
    return run_unit(config, "report", lambda out: build(config, out, compared),
                    extra_key=[(run.run_id, run.evaluated) for run in compared])
