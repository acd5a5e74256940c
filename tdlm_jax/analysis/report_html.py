"""The HTML of `tdlm_jax.report`: pure functions from already computed parts to markup.

Everything is inline (style, base64 images) so the page opens offline, from a file or an
e-mail attachment, and every value from a run is escaped, since metric names, alert
messages and config strings come from files.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from tdlm_jax.analysis import verdicts
from tdlm_jax.metrics.formatting import format_number as fmt  # the project's one number formatter

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px;
       color: #222; max-width: 1500px; }
h1 { margin-bottom: 4px; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 32px; }
.meta { color: #555; margin: 2px 0; } .note { color: #666; font-style: italic; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-family: monospace; }
.cards { display: flex; flex-wrap: wrap; gap: 16px; }
.card { flex: 1 1 420px; border: 1px solid #ddd; border-radius: 6px; padding: 10px 14px; }
.card h3 { margin: 0 0 6px 0; font-size: 16px; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 13px; color: #fff; }
.healthy { background: #2e7d32; } .warning { background: #c62828; } .nodata { background: #757575; }
.card ul { margin: 6px 0 0 0; padding-left: 0; list-style: none; font-size: 13px; }
.card li { margin: 4px 0; padding-left: 20px; text-indent: -20px; }
.mark { display: inline-block; width: 16px; text-align: center; font-weight: bold; }
.healthy-mark { color: #2e7d32; } .warning-mark { color: #c62828; } .nodata-mark { color: #757575; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); gap: 14px; }
figure { margin: 0; border: 1px solid #eee; border-radius: 4px; padding: 6px; }
figure img { width: 100%; height: auto; display: block; }
figcaption { font-size: 12px; color: #444; margin-top: 2px; }
figcaption code { font-weight: bold; color: #222; }
.tables { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
.alert-start { color: #c62828; font-weight: bold; }
pre { white-space: pre-wrap; margin: 2px 0; font-size: 12px; }
"""

# One line under a plot, for a reader new to the metrics (from the README and the guide).
DESCRIPTIONS = {
    "{train,val}/loss": "NELBO in nats per token; val uses exact weights and fixed batches.",
    "{metrics,val}/mask_accuracy": "share of masked tokens predicted right; guide's target 60%+.",
    "metrics/valid_ratio": "masks on real tokens / all masks; should stay near 1.0.",
    "metrics/total_masked_tokens": "masked tokens per batch; should vary with t, not be constant.",
    "research/{low,medium,high}_corruption_accuracy": "expected order: low ≥ medium ≥ high.",
    "research/{low,medium,high}_corruption_loss": "each bucket's share; the three add up to train/loss.",
    "research/gradient_norm_{low,medium,high}_corruption": "norm of each bucket's gradient.",
    "research/gradient_norm_ratio_high_to_low": "green: the guide's balanced range 0.2–2.0.",
    "research/avg_loss_weight": "green: the guide's stable range 1–3.",
    "research/weight_difficulty_correlation": "the guide expects 0.1–0.5, but with w(t) = 1/t the "
    "largest weights go to lightly masked, easier tokens, so this objective gives negative values.",
    "research/avg_prediction_difficulty": "1 − top predicted probability; should fall as training goes on.",
    "advanced/attention_entropy/layer_{i}": "should stay stable; a steady fall means attention collapse.",
    "advanced/attention_entropy_proxy": "should be stable, not decreasing (attention collapse).",
    "advanced/hidden_state_norm": "green: the guide's stable range 1–10.",
    "advanced/sequence_diversity": "should stay consistent (positional awareness).",
}

_BADGE = {verdicts.HEALTHY: "healthy", verdicts.WARNING: "warning", verdicts.NO_DATA: "nodata"}
_MARK = {verdicts.HEALTHY: "✓", verdicts.WARNING: "⚠", verdicts.NO_DATA: "…"}


def slug(text: str) -> str:
    """An HTML id from a metric or panel name."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def verdict_card(verdict: verdicts.Verdict) -> str:
    """One component's verdict: the status badge, then every check with its reason."""
    items = "".join(f'<li><span class="mark {_BADGE[c.status]}-mark" title="{escape(c.status)}">'
                    f'{_MARK[c.status]}</span> <b>{escape(c.name)}</b>: {escape(c.reason)}</li>'
                    for c in verdict.checks)
    return (f'<div class="card"><h3>{escape(verdict.component)} '
            f'<span class="badge {_BADGE[verdict.status]}">{escape(verdict.status)}</span></h3>'
            f'<ul>{items}</ul></div>')


def summary_tables(summary: Mapping[str, Any] | None, latest: Sequence[tuple[str, int, float]]) -> str:
    """The summary/* numbers (or a note that the run has not written them) and latest values."""
    if summary:
        rows = []
        for key, value in summary.items():
            extra = f" ({60 * value:.1f} min)" if key.endswith("hours") and isinstance(value, float) else ""
            rows.append(f'<tr><td>{escape(key)}</td><td class="num">{escape(fmt(value))}{extra}</td></tr>')
        first = f'<table><tr><th>summary</th><th>value</th></tr>{"".join(rows)}</table>'
    else:
        first = '<p class="note">no summary yet (summary.json is written when the run ends)</p>'
    if not latest:
        return first
    rows = "".join(f'<tr><td>{escape(n)}</td><td class="num">{s}</td><td class="num">{escape(fmt(v))}</td></tr>'
                   for n, s, v in latest)
    return (f'<div class="tables">{first}<table><tr><th>latest tier-1 value</th><th>step</th>'
            f'<th>value</th></tr>{rows}</table></div>')


def alerts_table(alerts: Sequence[Mapping[str, Any]], file_exists: bool) -> str:
    """Every alert event, in step order, or a note that there are none."""
    if not alerts:
        why = "alerts.jsonl has no events" if file_exists else "no alerts.jsonl in the workdir"
        return f'<p class="note">no alerts ({why})</p>'
    rows = []
    for a in sorted(alerts, key=lambda a: a["step"]):
        named = a.get("values") if isinstance(a.get("values"), Mapping) else {}
        values = ", ".join(f"{k}={fmt(v)}" for k, v in named.items())
        event = str(a.get("event", ""))
        css = ' class="alert-start"' if event == "start" else ""
        text = {key: escape(str(a.get(key, ""))) for key in ("rule", "message", "meaning")}
        rows.append(f'<tr><td class="num">{a["step"]}</td><td>{text["rule"]}</td>'
                    f'<td{css}>{escape(event)}</td><td>{escape(values)}</td>'
                    f'<td>{text["message"]}</td><td>{text["meaning"]}</td></tr>')
    return ('<p class="meta">Starts are marked on the plots of the metrics they name: red dashed line '
            '(clears: grey dotted).</p><table><tr><th>step</th><th>rule</th><th>event</th><th>values</th>'
            f'<th>message</th><th>meaning</th></tr>{"".join(rows)}</table>')


EVOLUTION_ROWS = 12  # evaluations shown in the samples' evolution table, first and last included
EVOLUTION_CHARS = 200  # of each sample there


def evolution_steps(steps: Sequence[int], at_most: int = EVOLUTION_ROWS) -> list[int]:
    """Up to `at_most` of the sorted distinct `steps`, evenly spread, the first and the last kept."""
    distinct = sorted(set(steps))
    if len(distinct) <= at_most:
        return distinct
    return sorted({distinct[round(i * (len(distinct) - 1) / (at_most - 1))] for i in range(at_most)})


def samples_section(samples: Sequence[Mapping[str, Any]], file_exists: bool) -> str:
    """The latest evaluation's samples in full, then sample 0 over the run's evaluations."""
    if not samples:
        why = "samples.jsonl has no rows" if file_exists else "no samples.jsonl in the workdir"
        return (f'<section id="samples"><h2>Samples</h2><p class="note">no samples yet ({why}; drawn at '
                'every evaluation when sampling.num_samples_at_eval &gt; 0)</p></section>')
    last = max(s["step"] for s in samples)
    latest = []
    for s in sorted((s for s in samples if s["step"] == last), key=lambda s: s.get("index", 0)):
        how = f'{s.get("sampler", "?")}, {s.get("steps", "?")} steps, {s.get("nfe", "?")} denoiser calls'
        latest.append(f'<figure><figcaption>sample {escape(str(s.get("index", "")))} ({escape(how)})'
                      f'</figcaption><pre>{escape(str(s.get("text", "")))}</pre></figure>')
    first_sample = {s["step"]: s for s in sorted(samples, key=lambda s: -s.get("index", 0))}  # index 0 wins
    rows = []
    for step in evolution_steps(list(first_sample)):
        text = str(first_sample[step].get("text", ""))
        cut = text[:EVOLUTION_CHARS] + ("…" if len(text) > EVOLUTION_CHARS else "")
        rows.append(f'<tr><td class="num">{step}</td><td><pre>{escape(cut)}</pre></td></tr>')
    prompt = samples[-1].get("prompt") or ""
    prompt_note = f' after the prompt "{escape(prompt)}"' if prompt else ""
    return (f'<section id="samples"><h2>Samples</h2><p class="meta">Drawn at every evaluation with a fixed '
            f'seed{prompt_note}, so they differ only by training (all of them in samples.jsonl). Latest: '
            f'step {last}.</p><div class="grid">{"".join(latest)}</div><h3>Sample 0 over training</h3>'
            f'<table><tr><th>step</th><th>text</th></tr>{"".join(rows)}</table></section>')


def tier_section(title: str, plots: Sequence[tuple[Any, str]], empty_note: str) -> str:
    """A tier: a grid of plots with captions, or the note saying when data will come."""
    body = f'<p class="note">{escape(empty_note)}</p>'
    if plots:
        figures = []
        for panel, png in plots:
            names = "" if len(panel.metrics) == 1 else f'<br>{escape(", ".join(panel.metrics))}'
            desc = DESCRIPTIONS.get(panel.title, "")
            figures.append(f'<figure id="{slug(panel.title)}"><img alt="{escape(panel.title)}" '
                           f'src="data:image/png;base64,{png}"><figcaption><code>{escape(panel.title)}</code> '
                           f'{escape(desc)}{names}</figcaption></figure>')
        body = f'<div class="grid">{"".join(figures)}</div>'
    return f'<section id="{slug(title)}"><h2>{escape(title)}</h2>{body}</section>'


def config_tables(config: Mapping[str, Any] | None, columns: int = 3) -> str:
    """The resolved config as `group.key = value` rows, split into side-by-side tables.

    Dotted keys are the command-line override names (`--config.training.batch_size`);
    equal columns keep the long `training` group from making the page taller than needed.
    """
    if not config:
        return '<p class="note">config.json not found</p>'
    # Top-level scalars (seed) first, then the groups, as in the config file.
    items = sorted(_flatten(config), key=lambda kv: "." in kv[0])
    per_column = -(-len(items) // columns)
    tables = []
    for i in range(0, len(items), per_column):
        rows = "".join(f'<tr><td>{escape(k)}</td><td class="num">{escape(json.dumps(v))}</td></tr>'
                       for k, v in items[i:i + per_column])
        tables.append(f'<table><tr><th>key</th><th>value</th></tr>{rows}</table>')
    return f'<div class="tables">{"".join(tables)}</div>'


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def render_page(*, workdir: str, generated: str, status: str, notes: Sequence[str],
                component_verdicts: Sequence[verdicts.Verdict], summary: Mapping[str, Any] | None,
                latest: Sequence[tuple[str, int, float]], alerts: Sequence[Mapping[str, Any]],
                alerts_file: bool, samples: Sequence[Mapping[str, Any]], samples_file: bool,
                tiers: Sequence[tuple[str, Sequence[tuple[Any, str]], str]],
                config: Mapping[str, Any] | None) -> str:
    """The whole page."""
    note_html = "".join(f'<p class="note">{escape(n)}</p>' for n in notes)
    nav = " · ".join(f'<a href="#{slug(t)}">{escape(t)}</a>' for t, _, _ in tiers)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>tdlm_jax report: {escape(workdir)}</title>
<style>{CSS}</style></head><body>
<h1>tdlm_jax run report</h1>
<p class="meta"><b>{escape(workdir)}</b> · {escape(status)} · generated {escape(generated)}</p>
<p class="meta">Jump to: <a href="#verdicts">verdicts</a> · <a href="#summary">summary</a> ·
<a href="#alerts">alerts</a> · <a href="#samples">samples</a> · {nav} · <a href="#config">config</a></p>{note_html}
<section id="verdicts"><h2>Verdicts</h2>
<p class="meta">Following the metrics guide's "Healthy Training Indicators", from the latest logs.</p>
<div class="cards">{"".join(verdict_card(v) for v in component_verdicts)}</div></section>
<section id="summary"><h2>Summary</h2>{summary_tables(summary, latest)}</section>
<section id="alerts"><h2>Alerts</h2>{alerts_table(alerts, alerts_file)}</section>
{samples_section(samples, samples_file)}
{"".join(tier_section(t, plots, note) for t, plots, note in tiers)}
<section id="config"><h2>Config</h2>{config_tables(config)}</section>
</body></html>
"""
