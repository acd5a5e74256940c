"""The run report: DIR/report.html, one self-contained page (`python -m tdlm_jax.report`).

The page opens offline: plots are base64 PNGs drawn with matplotlib's Agg backend, the
style is inline, and nothing is fetched. It reads what a run leaves in its workdir
(metrics.jsonl, alerts.jsonl, config.json, summary.json); any of them may be missing or
still growing, so a run in progress, or one with tier-1 data only, renders too.

In a notebook: `build_report(workdir)` returns the HTML, `write_report(workdir)` writes it.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import io
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

# The Figure API with an explicit Agg canvas, not pyplot: no global figure state and no
# GUI backend, so rendering works headless and never touches a user's pyplot session.
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tdlm_jax.analysis import verdicts
from tdlm_jax.analysis.report_html import render_page
from tdlm_jax.metrics import catalogue, jsonl

History = dict[str, list[tuple[int, float | None]]]
REPORT_FILE = "report.html"

# (title, catalogue tier) of the page's sections.
TIERS = (
    ("Tier 1: Essential", catalogue.TIER1),
    ("Tier 2: Research", catalogue.TIER2),
    ("Tier 3: Advanced", catalogue.TIER3),
)

# The adaptive time proposal's bins, drawn as one heat map of q·K (1 = uniform) over steps.
PROPOSAL_PANEL = "research/time_proposal/bin_{k}"
# Derived here from two logged series (not a catalogued name): see `with_derived`.
RUNNING_NOISE_SCALE = "research/gradient_noise_scale_running"

# Metrics drawn together: (pattern, panel title); group 1 of the match is the legend label.
_GROUPS = (
    (r"^(train|val)/loss$", "{train,val}/loss"),
    (r"^(metrics|val)/mask_accuracy$", "{metrics,val}/mask_accuracy"),
    (r"^research/(low|medium|high)_corruption_accuracy$", "research/{low,medium,high}_corruption_accuracy"),
    (r"^research/(low|medium|high)_corruption_count$", "research/{low,medium,high}_corruption_count"),
    (r"^research/(low|medium|high)_corruption_loss$", "research/{low,medium,high}_corruption_loss"),
    (r"^research/gradient_norm_(low|medium|high)_corruption$",
     "research/gradient_norm_{low,medium,high}_corruption"),
    (r"^research/(low|medium|high)_corruption_loss_std$", "research/{low,medium,high}_corruption_loss_std"),
    # One step's noise scale beside the steady estimate, the ratio of its components' running means.
    (r"^research/gradient_noise_scale(_running)?$", "research/gradient_noise_scale"),
    (r"^research/time_proposal/bin_(\d+)$", PROPOSAL_PANEL),
    # The all-layer mean joins its layers (label "mean"): alerts on it then mark this plot.
    (r"^advanced/attention_entropy(?:/layer_(\d+))?$", "advanced/attention_entropy/layer_{i}"),
)
_LABELS = {"metrics": "train", "_running": "running ratio of means"}  # metrics/…: the training batch's
_LABEL_ORDER = {"train": 0, "val": 1, "low": 0, "medium": 1, "high": 2, "mean": -1}

# Panels in reading order: the guide's most important metrics first; the rest follow sorted.
_ORDER = (
    "{train,val}/loss", "{metrics,val}/mask_accuracy", "val/perplexity", "val/bits_per_token",
    "train/grad_norm", "train/learning_rate", "train/tokens_per_second",
    "metrics/total_masked_tokens", "metrics/valid_ratio",
    "research/{low,medium,high}_corruption_accuracy", "research/{low,medium,high}_corruption_count",
    "research/{low,medium,high}_corruption_loss", "research/gradient_norm_{low,medium,high}_corruption",
    "research/gradient_norm_total", "research/gradient_norm_ratio_high_to_low",
    "research/weight_difficulty_correlation", "research/avg_loss_weight", "research/weight_std",
    "research/avg_prediction_difficulty", "advanced/attention_entropy/layer_{i}",
)

# The guide's healthy ranges, shaded and kept in view: where the values sit inside (or
# how far outside) the range is what a reader needs, not their tiny step-to-step wiggle.
BANDS = {
    catalogue.GRADIENT_RATIO: (0.2, 2.0),
    catalogue.AVG_LOSS_WEIGHT: (1.0, 3.0),
    catalogue.HIDDEN_STATE_NORM: (1.0, 10.0),
}
# Y ranges always shown. valid_ratio: a dip from 1.0 to 0.9999 filled the whole panel,
# reading as a collapse; the verdict's threshold (0.9) is the scale that matters.
Y_INCLUDE = {catalogue.VALID_RATIO: (0.9, 1.0)}

# Line colours: tab10 without its red, which marks alerts and non-finite values.
_RED = "#d62728"
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf")


@dataclasses.dataclass(frozen=True)
class Panel:
    """One plot: its title and the (metric, legend label) pairs drawn in it."""

    title: str
    series: tuple[tuple[str, str], ...]

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.series)


# --- reading the workdir ----------------------------------------------------------------


def build_history(rows: Sequence[Mapping[str, Any]]) -> History:
    """{metric: [(step, value or None)]} sorted by step, one point per step.

    The last row wins for a repeated step: a resumed run re-logs the steps after its last
    checkpoint, and the final evaluation may repeat the last one.
    """
    by_metric: dict[str, dict[int, float | None]] = {}
    for row in rows:
        for name, value in row.items():
            if name == "step" or not (value is None or isinstance(value, (int, float))):
                continue
            by_metric.setdefault(name, {})[row["step"]] = None if value is None else float(value)
    return {name: sorted(steps.items()) for name, steps in by_metric.items()}


# --- grouping metrics into panels -------------------------------------------------------


def _label_key(label: str) -> tuple[int, int | str]:
    """Legend order: layers by number (10 after 2), buckets low → high, train before val."""
    layer = re.fullmatch(r"layer (\d+)", label)
    if layer:
        return (0, int(layer.group(1)))
    return (_LABEL_ORDER.get(label, 99), label)


def group_panels(names: Sequence[str]) -> list[Panel]:
    """The panels for these metrics: bucket, layer and train/val metrics share one each."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for name in names:
        for pattern, title in _GROUPS:
            match = re.match(pattern, name)
            if match:
                label = _LABELS.get(match.group(1), match.group(1) or ("one step" if "noise" in title else "mean"))
                if label.isdigit():
                    label = f"bin {label}" if title == PROPOSAL_PANEL else f"layer {label}"
                groups.setdefault(title, []).append((name, label))
                break
        else:
            groups[name] = [(name, name.split("/")[-1])]
    panels = [Panel(t, tuple(sorted(s, key=lambda p: _label_key(p[1])))) for t, s in groups.items()]
    rank = {title: i for i, title in enumerate(_ORDER)}
    return sorted(panels, key=lambda p: (rank.get(p.title, len(rank)), p.title))


def tier_metrics(history: Mapping[str, Any], tier: str) -> list[str]:
    """The metrics of the history that the catalogue puts in `tier` (derived ones in tier 2)."""
    return [name for name in history if (catalogue.TIER2 if name == RUNNING_NOISE_SCALE else catalogue.tier_of(name))
            == tier]


def with_derived(history: History) -> History:
    """The history plus the noise scale's steady estimate: at each detailed step, the ratio
    of the running means (sums) of its numerator tr(Σ) and denominator |G|² so far."""
    trace = dict(verdicts.points(history, catalogue.GRADIENT_NOISE_TRACE))
    signal = dict(verdicts.points(history, catalogue.GRADIENT_SIGNAL))
    running, total_trace, total_signal = [], 0.0, 0.0
    for step in sorted(trace.keys() & signal.keys()):
        total_trace, total_signal = total_trace + trace[step], total_signal + signal[step]
        running.append((step, total_trace / total_signal if total_signal > 0 else None))
    return {**history, RUNNING_NOISE_SCALE: running} if running else history


def alerts_for(panel: Panel, alerts: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The alerts whose `values` name a metric of this panel."""
    wanted = set(panel.metrics)
    return [a for a in alerts if wanted & set(a.get("values") or {})]


# --- plotting ---------------------------------------------------------------------------


def png_base64(fig: Figure) -> str:
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _draw_alerts(ax: Any, alerts: Sequence[Mapping[str, Any]]) -> None:
    """Red dashed line where an alert starts, its rule written beside it; grey dotted at a clear."""
    starts: dict[int, list[str]] = {}
    clears = sorted({a["step"] for a in alerts if a.get("event") != "start"})
    for alert in alerts:
        if alert.get("event") == "start":
            starts.setdefault(alert["step"], []).append(str(alert.get("rule", "?")))
    for i, step in enumerate(clears):
        ax.axvline(step, color="#888888", linestyle=":", linewidth=1.0, zorder=1,
                   label="alert clear" if i == 0 else None)
    for i, (step, rules) in enumerate(sorted(starts.items())):
        ax.axvline(step, color=_RED, linestyle="--", linewidth=1.4, zorder=1,
                   label="alert start" if i == 0 else None)
        # Named beside the line, not in the legend: one legend entry per rule squeezed the plot.
        ax.text(step, 0.97, ", ".join(dict.fromkeys(rules)) + " ", transform=ax.get_xaxis_transform(),
                rotation=90, va="top", ha="right", fontsize=6.5, color=_RED)


def _draw_series(ax: Any, panel: Panel, history: History) -> bool:
    """Draws each metric, its non-finite points as red crosses; False if nothing finite."""
    non_finite: list[int] = []
    n = len(panel.series)
    # Many layers: a colormap, so that layer 0 and layer 8 do not share a colour.
    colors = COLORS if n <= len(COLORS) else [colormaps["viridis"](i / (n - 1)) for i in range(n)]
    for color, (name, label) in zip(colors, panel.series):
        pts = verdicts.points(history, name)
        non_finite += [s for s, v in pts if not math.isfinite(v)]
        finite = [(s, v) for s, v in pts if math.isfinite(v)]
        if finite:
            xs, ys = zip(*finite)
            # Markers while points are few: tier-2/3 logs are sparse and a 2-point line hides them.
            ax.plot(xs, ys, marker="o" if len(xs) <= 200 else None, markersize=3 if len(xs) > 30 else 4,
                    linewidth=1.5, color=color, label=label if n > 1 else None)
    drawn = bool(ax.lines)
    if not drawn:
        ax.text(0.5, 0.5, "all values missing or non-finite", ha="center", va="center",
                transform=ax.transAxes, color="#666666")
    if non_finite:  # red crosses on the top edge: a NaN has no y, but its step matters
        bad_steps = sorted(set(non_finite))
        ax.plot(bad_steps, [1.0] * len(bad_steps), transform=ax.get_xaxis_transform(), linestyle="none",
                marker="x", markersize=7, markeredgewidth=2, color=_RED, clip_on=False, label="NaN/inf")
    return drawn


def _set_ranges(ax: Any, panel: Panel, steps: tuple[int, int] | None, has_data: bool) -> None:
    """The healthy band, the y range always shown, and the x range shared by all panels."""
    if panel.title in BANDS and has_data:
        ax.axhspan(*BANDS[panel.title], color="#2ca02c", alpha=0.12, zorder=0)
    if panel.title in Y_INCLUDE and has_data:
        lo, hi = ax.get_ylim()
        want_lo, want_hi = Y_INCLUDE[panel.title]
        pad = 0.05 * (max(hi, want_hi) - min(lo, want_lo))
        ax.set_ylim(min(lo, want_lo - pad), max(hi, want_hi + pad))
    if steps is not None:
        pad = 0.03 * max(steps[1] - steps[0], 1)
        ax.set_xlim(steps[0] - pad, steps[1] + pad)


def _draw_proposal(fig: Figure, ax: Any, panel: Panel, history: History) -> None:
    """The adaptive proposal over time: bin (t from t_min at the bottom to 1) × detailed step,
    coloured by q_k·K, the bin's probability relative to uniform."""
    by_bin = [dict(verdicts.points(history, name)) for name in panel.metrics]
    steps = sorted(set().union(*by_bin))
    num_bins = len(by_bin)
    grid = [[by_bin[k].get(step, math.nan) * num_bins for step in steps] for k in range(num_bins)]
    # Detailed steps are evenly spaced, so an image whose columns are one spacing wide, centred
    # on the steps, places each where it was logged.
    half = (steps[-1] - steps[0]) / (2 * (len(steps) - 1)) if len(steps) > 1 else 0.5
    image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis", interpolation="nearest",
                      extent=(steps[0] - half, steps[-1] + half, 0, num_bins))
    fig.colorbar(image, ax=ax, label="q·K (1 = uniform)")
    ax.set_xlabel("step", fontsize=9)
    ax.set_ylabel("bin of t (t_min → 1)", fontsize=9)
    ax.tick_params(labelsize=8)


def plot_panel(panel: Panel, history: History, alerts: Sequence[Mapping[str, Any]] = (),
               steps: tuple[int, int] | None = None) -> str:
    """The panel as a base64 PNG: one line per metric, alerts, non-finite points marked.

    `steps` (first, last) is the x range shared by all panels, so a tier-2 point logged
    once sits where it belongs in the run and alert lines align from panel to panel.
    """
    fig = Figure(figsize=(4.6, 3.0), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    if panel.title == PROPOSAL_PANEL:
        _draw_proposal(fig, ax, panel, history)
        return png_base64(fig)
    has_data = _draw_series(ax, panel, history)
    _draw_alerts(ax, alerts)
    _set_ranges(ax, panel, steps, has_data)
    ax.set_xlabel("step", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.ticklabel_format(axis="y", useOffset=False)
    if panel.title.endswith("_count"):  # sequence counts: no 9.5-sequence ticks
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        # Above the axes: inside, even loc="best" covered points of the sparse tier-2 lines.
        ax.legend(handles, labels, fontsize=7, loc="lower left", bbox_to_anchor=(0.0, 1.0),
                  ncol=min(len(labels), 4), frameon=False, borderaxespad=0.2, handlelength=1.5)
    return png_base64(fig)


# --- the page ---------------------------------------------------------------------------


def _interval_note(config: Mapping[str, Any] | None, tier: str) -> str:
    """'no data yet (logged every N steps: training.key)', plus a hint if the run is shorter."""
    training = (config or {}).get("training", {})
    key = catalogue.INTERVALS[tier].split(".", 1)[1]
    every, total = training.get(key), training.get("num_steps")
    note = f"no data yet (logged every {every if every is not None else '?'} steps: training.{key})"
    if isinstance(every, int) and isinstance(total, int) and total < every:
        note += f"; this run has {total} steps, fewer than that interval"
    return note


def run_status(history: History, config: Mapping[str, Any] | None, summary: Mapping[str, Any] | None) -> str:
    """One line: finished, or how far a run in progress (or stopped) has got."""
    steps = [s for pts in history.values() for s, _ in pts]
    total = (config or {}).get("training", {}).get("num_steps")
    of_total = f" of {total}" if total is not None else ""
    if summary:
        return f"finished: {max(steps, default=0)}{of_total} steps"
    if not steps:
        return "no metrics yet"
    return f"not finished (still running, or stopped): last logged step {max(steps)}{of_total}"


def build_report(workdir: str, now: datetime.datetime | None = None) -> str:
    """The report of the run in `workdir`, as one self-contained HTML string."""
    rows, skipped = jsonl.read_counted(os.path.join(workdir, jsonl.METRICS_FILE))
    alerts, alert_skipped = jsonl.read_counted(os.path.join(workdir, jsonl.ALERTS_FILE))
    samples, samples_skipped = jsonl.read_counted(os.path.join(workdir, jsonl.SAMPLES_FILE))
    config = jsonl.read_json(os.path.join(workdir, jsonl.CONFIG_FILE))
    summary = jsonl.read_json(os.path.join(workdir, jsonl.SUMMARY_FILE))
    history = build_history(rows)
    if summary is None:  # summary.json comes last; the summary/* row may already be there
        summary = {k: pts[-1][1] for k, pts in history.items() if catalogue.tier_of(k) == catalogue.SUMMARY and pts
                   } or None
    weighting = (config or {}).get("diffusion", {}).get("loss_weighting", "elbo")

    stamp = (now or datetime.datetime.now(datetime.timezone.utc)).strftime("%Y-%m-%d %H:%M UTC")
    notes = [f"metrics.jsonl: skipped {skipped} unreadable line(s)"] if skipped else []
    notes += [f"alerts.jsonl: skipped {alert_skipped} unreadable line(s)"] if alert_skipped else []
    notes += [f"samples.jsonl: skipped {samples_skipped} unreadable line(s)"] if samples_skipped else []
    return render_page(
        workdir=os.path.abspath(workdir), generated=stamp, status=run_status(history, config, summary),
        notes=notes, component_verdicts=[verdicts.forward_process_verdict(history),
                                         verdicts.reverse_process_verdict(history, weighting)],
        summary=summary, latest=_latest_values(history, catalogue.TIER1),
        alerts=alerts, alerts_file=os.path.exists(os.path.join(workdir, jsonl.ALERTS_FILE)),
        samples=samples, samples_file=os.path.exists(os.path.join(workdir, jsonl.SAMPLES_FILE)),
        tiers=tier_sections(history, alerts, config), config=config)


def tier_sections(history: History, alerts: Sequence[Mapping[str, Any]],
                  config: Mapping[str, Any] | None) -> list[tuple[str, list[tuple[Panel, str]], str]]:
    """(title, [(panel, png)], note if empty) per tier, plus "Other metrics" for unknown prefixes."""
    history = with_derived(history)
    all_steps = [s for pts in history.values() for s, _ in pts] + [a["step"] for a in alerts]
    span = (min(all_steps), max(all_steps)) if all_steps else None

    def plots(names: Sequence[str]) -> list[tuple[Panel, str]]:
        return [(p, plot_panel(p, history, alerts_for(p, alerts), span)) for p in group_panels(names)]

    sections = [(title, plots(tier_metrics(history, tier)), _interval_note(config, tier)) for title, tier in TIERS]
    # summary/* and the summary's alert counts (alerts/*) are in the summary table, not plots.
    others = [name for name in history if catalogue.tier_of(name) is None and name != RUNNING_NOISE_SCALE]
    if others:
        sections.append(("Other metrics", plots(others), ""))
    return sections


def _latest_values(history: History, tier: str) -> list[tuple[str, int, float]]:
    """(metric, step, value) of the last non-missing value of each metric of `tier`."""
    latest = []
    for name in sorted(tier_metrics(history, tier)):
        pts = verdicts.points(history, name)
        if pts:
            latest.append((name, *pts[-1]))
    return latest


def write_report(workdir: str) -> str:
    """Writes `workdir`/report.html (atomically, so a browser never sees half a page)."""
    path = os.path.join(workdir, REPORT_FILE)
    page = build_report(workdir)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, path)
    return path
