"""Report (seed step 20): RESULTS in Markdown and HTML with PNG plots, from every phase's figures."""

from __future__ import annotations

import html
import io
import statistics

from jobs.phases import PHASE
from jobs.phases.base import PhaseConfig, run_unit, units
from jobs.store import UnitWriter


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def plots(history: list[dict], val: list[dict], replies: list[dict], ev: dict) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = {}
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss (per step)", alpha=0.8)
    if val:
        ax.plot([v["step"] for v in val], [v["loss"] for v in val], "o-", label="validation loss")
    ax.set(xlabel="step", ylabel="NLL per assistant token", title="Student training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    images["loss.png"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = [i / 20 for i in range(-4, 21)]
    ax.hist([r["similarity_base"] for r in replies], bins=bins, alpha=0.6, label=f"base (mean {ev['similarity_base']:.3f})")
    ax.hist([r["similarity_student"] for r in replies], bins=bins, alpha=0.6,
            label=f"student (mean {ev['similarity_student']:.3f})")
    ax.hist([r["similarity_teacher_resampled"] for r in replies], bins=bins, histtype="step", linewidth=2,
            color="black", label=f"a second teacher sample (mean {ev['similarity_teacher_resampled']:.3f})")
    ax.set(xlabel="cosine similarity to the teacher's reply", ylabel="eval prompts",
           title="Similarity to the teacher (all-MiniLM-L6-v2)")
    ax.legend(loc="upper left", fontsize="small")
    images["similarity.png"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = ["base, no card", "student, no card", "teacher (base + card)"]
    values = [ev["nll_base"], ev["nll_student"], ev["nll_teacher"]]
    ax.bar(names, values, color=["#999999", "#3b7dd8", "#d88b3b"])
    for i, value in enumerate(values):
        ax.text(i, value, f"{value:.2f}", ha="center", va="bottom")
    ax.set(ylabel="NLL per token", title="NLL of the teacher's replies")
    images["nll.png"] = _png(fig)
    plt.close(fig)
    return images


def figures(train: dict, ev: dict, audit: dict) -> list[tuple[str, str]]:
    gap = ev["nll_gap_closed"]
    return [
        ("train loss, first → last step", f"{train['first_loss']:.3f} → {train['last_loss']:.3f}"),
        ("train loss, mean of first → last steps", f"{train['first_loss_mean']:.3f} → {train['last_loss_mean']:.3f}"
                                                    f" ({'down' if train['last_loss_mean'] < train['first_loss_mean'] else 'NOT down'})"),
        ("validation loss, last", f"{train['val_loss_last']:.3f}" if train.get("val_loss_last") is not None else "n/a"),
        ("similarity to teacher, student", f"{ev['similarity_student']:.3f}"),
        ("similarity to teacher, base (no card)", f"{ev['similarity_base']:.3f}"),
        ("similarity to teacher, a second teacher sample (its own spread)", f"{ev['similarity_teacher_resampled']:.3f}"),
        ("similarity to the character (name, topics): student / base / teacher", f"{ev['persona_similarity_student']:.3f} / "
                                                             f"{ev['persona_similarity_base']:.3f} / "
                                                             f"{ev['persona_similarity_teacher']:.3f}"),
        ("replies out of character (\"as an AI\"...): student / base / teacher",
         f"{ev['out_of_character_student']:.0%} / {ev['out_of_character_base']:.0%} / "
         f"{ev['out_of_character_teacher']:.0%}"),
        ("NLL of teacher replies: student / base / teacher", f"{ev['nll_student']:.3f} / {ev['nll_base']:.3f} / "
                                                           f"{ev['nll_teacher']:.3f}"),
        ("NLL gap closed (base → teacher)", f"{gap:.1%}" if gap is not None else "n/a (teacher not below base)"),
        ("prompt tokens per request, with / without card", f"{ev['prompt_tokens_with_card']:.0f} / "
                                                          f"{ev['prompt_tokens_without_card']:.0f}"),
        ("token reduction", f"{ev['token_reduction']:.1%}"),
        ("cost ratio per request (with ÷ without card)", f"{ev['cost_ratio']:.2f}x (prompt tokens alone "
                                                        f"{ev['prompt_cost_ratio']:.1f}x)"),
        ("latency ratio per request (with ÷ without card)", f"{ev['latency_ratio']:.2f}x ({ev['latency_with_card_s']:.2f}s"
                                                           f" vs {ev['latency_without_card_s']:.2f}s)"),
        ("prefill latency ratio", f"{ev['prefill_ratio']:.1f}x"),
        ("training rows kept by the audit", f"{audit['kept']} of {audit['rows_in']} ({audit['trimmed']} trimmed to"
                                            f" whole sentences)"),
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


def render_markdown(title: str, rows: list[tuple[str, str]], times: list[tuple[str, float]], samples: list[dict],
                    notes: str, ingest: list[tuple[str, str]]) -> str:
    lines = [f"# {title}", "", notes, "", "| figure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "## Card and prompts", "", "| what | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in ingest]
    lines += ["", "![loss](loss.png)", "", "![similarity](similarity.png)", "", "![nll](nll.png)", "",
              "## Phase wall times", "", "| unit | seconds |", "|---|---|"]
    lines += [f"| {unit} | {sec:.1f} |" for unit, sec in times]
    lines += ["", "## Samples (held-out prompts)", ""]
    for s in samples:
        lines += [f"**Prompt:** {s['prompt']}", "", f"- *teacher:* {s['teacher']}", f"- *student:* {s['student']}",
                  f"- *base:* {s['base']}", ""]
    return "\n".join(lines) + "\n"


def render_html(title: str, rows: list[tuple[str, str]], times: list[tuple[str, float]], samples: list[dict],
                notes: str, ingest: list[tuple[str, str]]) -> str:
    e = html.escape
    table = "".join(f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in rows)
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
            f"<h1>{e(title)}</h1><p>{e(notes)}</p><table>{table}</table><h2>Card and prompts</h2><table>{card}</table>"
            "<img src='loss.png' alt='loss curve'><img src='similarity.png' alt='similarity histograms'>"
            f"<img src='nll.png' alt='NLL bars'><h2>Phase wall times</h2><table>{timing}</table>"
            f"<h2>Samples (held-out prompts)</h2>{sample_html}</body></html>")


def build(config: PhaseConfig, out: UnitWriter) -> None:
    store = config.store
    train = store.require("train")["metrics"]
    ev = store.read_json("evaluate", "metrics.json")
    audit = store.read_json("audit", "audit.json")
    replies = store.read_jsonl("evaluate", "replies.jsonl")
    history, val = store.read_jsonl("train", "metrics.jsonl"), store.read_jsonl("train", "val.jsonl")
    card = store.read_json("ingest", "card.json")
    times = [(unit, store.require(unit)["wall_s"]) for phase in PHASE["report"].reads for unit in units(store, phase)]
    title = f"Distilling {card['name']}: run {config.run_id}"
    notes = (f"Profile {config.pipeline.profile}, base model {config.pipeline.model.base}, "
             f"{train['train_rows']} training rows, {train['steps']} steps, {ev['eval_prompts']} held-out eval prompts. "
             f"Prices: ${ev['prices_per_mtok']['input_per_mtok']}/M input, ${ev['prices_per_mtok']['output_per_mtok']}/M "
             "output tokens; the cost ratio uses the teacher's reply length for both sides.")
    tokens, dollars = usage(config)
    on_tinker = "" if train["backend"] == "tinker" else " if run on Tinker"
    rows = figures(train, ev, audit) + [
        ("tokens: prefill / sample / train", " / ".join(f"{tokens[k]:,}" for k in ("prefill_tokens", "sample_tokens",
                                                                                   "train_tokens"))),
        (f"cost of this run{on_tinker}, at tinker.prices", f"${dollars:.4f}")]
    samples = sorted(replies, key=lambda r: -r["similarity_student"])[:3] + replies[:2]
    for name, data in plots(history, val, replies, ev).items():
        out.write_bytes(name, data)
    ingest = card_and_prompts(store.read_json("ingest", "profile.json"))
    out.write_bytes("report.md", render_markdown(title, rows, times, samples, notes, ingest).encode())
    out.write_bytes("report.html", render_html(title, rows, times, samples, notes, ingest).encode())
    out.metrics.update({"loss_decreased": train["last_loss_mean"] < train["first_loss_mean"],
                        **tokens, "tinker_cost_usd": round(dollars, 6),
                        "similarity_median_student": statistics.median(r["similarity_student"] for r in replies)})


def main(config: PhaseConfig) -> dict:
    return run_unit(config, "report", lambda out: build(config, out))
