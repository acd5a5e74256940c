"""The page of a sampler comparison, `<workdir>/samplers_<step>.html`: generative perplexity and
unigram entropy against denoiser calls and against wall time, the frontier marked, the
records as a table with a few samples each, and the eval card. Self-contained like report.html."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from matplotlib import colormaps
from matplotlib.figure import Figure

from tdlm_jax.analysis.report_html import CSS
from tdlm_jax.analysis.run_report import png_base64
from tdlm_jax.metrics.formatting import format_number as fmt  # the project's one number formatter

_AXES = (("nfe", "denoiser calls (nfe)"), ("seconds_per_sample", "seconds per sample"))
_SCORES = (("gen/perplexity", "generative perplexity (lower is better)"),
           ("gen/unigram_entropy", "unigram entropy, nats (the data's: dashed)"))


def comparison_figure(records: Sequence[Mapping[str, Any]]) -> Figure:
    """2 × 2 panels: each score against each cost; one colour per sampler, its step counts
    joined; the frontier ringed, collapsed (low-diversity) records crossed."""
    fig = Figure(figsize=(11, 8), dpi=100, layout="constrained")
    axes = fig.subplots(2, 2)
    samplers = list(dict.fromkeys(r["sampler"] for r in records))
    colours = colormaps["tab10"]
    for row, (score, score_label) in enumerate(_SCORES):
        for col, (cost, cost_label) in enumerate(_AXES):
            ax = axes[row][col]
            for i, name in enumerate(samplers):
                own = sorted((r for r in records if r["sampler"] == name), key=lambda r: r[cost])
                ax.plot([r[cost] for r in own], [r[score] for r in own], "o-", color=colours(i), label=name)
                for r in own:
                    if r["steps"] is not None:
                        ax.annotate(str(r["steps"]), (r[cost], r[score]), fontsize=7, xytext=(3, 3),
                                    textcoords="offset points")
                    if r["frontier"]:
                        ax.plot(r[cost], r[score], "o", markersize=13, markerfacecolor="none", color="black")
                    if r["collapsed"]:
                        ax.plot(r[cost], r[score], "x", markersize=11, color="red")
            if score == "gen/unigram_entropy" and records:
                ax.axhline(records[0]["data_unigram_entropy"], color="grey", linestyle="--", linewidth=1)
            ax.set_xscale("log")
            ax.set_xlabel(cost_label)
            ax.set_ylabel(score_label)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("samplers: black ring = speed–quality frontier, red x = collapsed (entropy well below the data's)",
                 fontsize=10)
    return fig


def render_page(records: Sequence[Mapping[str, Any]], card: Mapping[str, Any], workdir: str) -> str:
    rows = []
    for r in records:
        note = "frontier" if r["frontier"] else ("collapsed" if r["collapsed"] else "")
        steps = "—" if r["steps"] is None else str(r["steps"])
        samples = "".join(f"<pre>{escape(text)}</pre>" for text in r["samples"])
        rows.append(f'<tr><td>{escape(r["sampler"])}</td><td class="num">{steps}</td><td class="num">{r["nfe"]}</td>'
                    f'<td class="num">{fmt(r["seconds_per_sample"])}</td><td class="num">{fmt(r["gen/perplexity"])}'
                    f'</td><td class="num">{fmt(r["gen/unigram_entropy"])}</td><td>{note}</td><td>{samples}</td></tr>')
    card_rows = "".join(f'<tr><td>{escape(k)}</td><td class="num">{escape(json.dumps(v))}</td></tr>'
                        for k, v in card.items())
    png = png_base64(comparison_figure(records))
    data_entropy = fmt(records[0]["data_unigram_entropy"]) if records else "n/a"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>tdlm_jax samplers: {escape(workdir)}</title>
<style>{CSS}</style></head><body>
<h1>Samplers: speed against quality</h1>
<p class="meta"><b>{escape(workdir)}</b> · checkpoint step {escape(str(card.get("checkpoint_step")))} ·
the data's unigram entropy over as many tokens: {data_entropy} nats</p>
<figure><img alt="samplers" src="data:image/png;base64,{png}"></figure>
<h2>Records</h2>
<table><tr><th>sampler</th><th>steps</th><th>nfe</th><th>s/sample</th><th>gen/perplexity</th><th>entropy</th>
<th>note</th><th>samples</th></tr>{"".join(rows)}</table>
<h2>Eval card</h2><table><tr><th>key</th><th>value</th></tr>{card_rows}</table>
</body></html>
"""
