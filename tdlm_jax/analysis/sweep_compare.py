"""The comparison of a sweep's points: `comparison.md` and `comparison.html` in the sweep dir.

It reads what each point's run leaves in its workdir (summary.json, metrics.jsonl,
alerts.jsonl), through the same readers as `tdlm_jax.report`, so a sweep that is still
running, or whose points failed, compares too: missing values show as "—". Points whose
overrides differ only in `seed` form a group, shown as mean ± std over its seeds.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from matplotlib.figure import Figure

from tdlm_jax.analysis import run_report as report
from tdlm_jax.analysis.report_html import CSS
from tdlm_jax.analysis.verdicts import points as metric_points
from tdlm_jax.errors import SweepError
from tdlm_jax.metrics import jsonl
from tdlm_jax.metrics import catalogue as names
from tdlm_jax.metrics.catalogue import BUCKETS, bucket_name
from tdlm_jax.metrics.formatting import format_number
from tdlm_jax.sweeps.runner import format_value

MISSING = "—"
SEED_KEY = "seed"

# (column title, how the point's value is taken); see `point_values`.
COLUMNS = (
    "best val loss", "final mask acc", "low acc", "medium acc", "high acc",
    "grad ratio high/low", "loss stderr", "tokens/s", "alerts",
)
_LAST = {
    "final mask acc": names.MASK_ACCURACY,
    **{f"{b} acc": bucket_name(names.BUCKET_ACCURACY, b) for b in BUCKETS},
    "grad ratio high/low": names.GRADIENT_RATIO,
}
# Curves overlaid across points: (panel title, metric). Panels with no data are left out,
# so an AR-only or tier-1-only sweep shows its loss alone.
CURVES = (
    (f"{names.VAL_LOSS} (diffusion: exact-weight NELBO; AR: exact NLL)", names.VAL_LOSS),
    *((name, name) for name in (
        names.TRAIN_LOSS, names.MASK_ACCURACY,
        *(bucket_name(names.BUCKET_ACCURACY, b) for b in BUCKETS),
        *(bucket_name(names.BUCKET_GRADIENT_NORM, b) for b in BUCKETS),
        names.GRADIENT_NORM_TOTAL, names.GRADIENT_RATIO, names.LOSS_ESTIMATOR_STDERR)),
)
_LINESTYLES = ("-", "--", ":", "-.")


@dataclasses.dataclass(frozen=True)
class PointRun:
    """What one point's workdir holds so far."""

    name: str
    overrides: dict[str, Any]
    directory: str
    summary: dict[str, Any] | None
    history: report.History
    alert_starts: int | None  # None: no alerts.jsonl and no summary to count from

    @property
    def status(self) -> str:
        if self.summary:
            return "finished"
        steps = [s for pts in self.history.values() for s, _ in pts]
        return f"step {max(steps)}" if steps else "not started"


# --- reading ----------------------------------------------------------------------------------


def sweep_points(sweep_dir: str) -> list[tuple[str, dict[str, Any], str]]:
    """(name, overrides, dir) of each point, from sweep.json."""
    record = jsonl.read_json(os.path.join(sweep_dir, "sweep.json"))
    if record is None or not isinstance(record.get("points"), list):
        raise SweepError(f"sweep error: no readable sweep.json in {sweep_dir!r}; run the sweep there first")
    # A moved sweep dir still works: a point's dir is looked up next to sweep.json first.
    found = []
    for p in record["points"]:
        local = os.path.join(sweep_dir, p["name"])
        found.append((p["name"], dict(p.get("overrides", {})), local if os.path.isdir(local) else p["dir"]))
    return found


def load_point(name: str, overrides: Mapping[str, Any], directory: str) -> PointRun:
    """A point's summary, metric history and alert count; all may be missing."""
    rows = jsonl.read(os.path.join(directory, jsonl.METRICS_FILE))
    summary = jsonl.read_json(os.path.join(directory, jsonl.SUMMARY_FILE))
    alerts = jsonl.read(os.path.join(directory, jsonl.ALERTS_FILE))
    starts: int | None = sum(a.get("event") == "start" for a in alerts)
    if summary and isinstance(summary.get(names.ALERTS_TOTAL), (int, float)):
        starts = int(summary[names.ALERTS_TOTAL])
    elif not os.path.exists(os.path.join(directory, jsonl.ALERTS_FILE)) and not summary:
        starts = None  # not written yet, which is not the same as "no alerts"
    return PointRun(name, dict(overrides), directory, summary, report.build_history(rows), starts)


def _last(history: report.History, name: str) -> float | None:
    pts = metric_points(history, name)
    return pts[-1][1] if pts else None


def point_values(run: PointRun) -> dict[str, float | None]:
    """The table's columns for one point; None where the point has no such value.

    Best val loss comes from summary.json; a point without one (still running, or
    stopped) shows the best val/loss logged so far, and its status says so.
    """
    best = (run.summary or {}).get(names.BEST_VAL_LOSS)
    if best is None:
        vals = [v for _, v in metric_points(run.history, names.VAL_LOSS) if math.isfinite(v)]
        best = min(vals) if vals else None
    speeds = [v for _, v in metric_points(run.history, names.TOKENS_PER_SECOND) if math.isfinite(v)]
    values: dict[str, float | None] = {"best val loss": best}
    values.update({column: _last(run.history, metric) for column, metric in _LAST.items()})
    values["tokens/s"] = round(statistics.fmean(speeds)) if speeds else None  # whole tokens: 10477, not 10477.3
    # The mean over research logs: one batch's standard error is itself a noisy estimate.
    stderrs = [v for _, v in metric_points(run.history, names.LOSS_ESTIMATOR_STDERR) if math.isfinite(v)]
    values["loss stderr"] = statistics.fmean(stderrs) if stderrs else None
    values["alerts"] = run.alert_starts
    return values


# --- grouping and formatting ------------------------------------------------------------------


def group_label(overrides: Mapping[str, Any]) -> str:
    """The overrides other than the seed, as `key=value, ...` (the group's identity)."""
    rest = [f"{k}={format_value(v)}" for k, v in overrides.items() if k != SEED_KEY]
    return ", ".join(rest) or "(base config)"


def group_runs(runs: Sequence[PointRun]) -> list[tuple[str, list[PointRun]]]:
    """Points grouped by their non-seed overrides, in sweep order."""
    groups: dict[str, list[PointRun]] = {}
    for run in runs:
        groups.setdefault(group_label(run.overrides), []).append(run)
    return list(groups.items())


def fmt_mean_std(values: Sequence[float]) -> str:
    """mean ± sample std of the values present; a single value alone; none as "—"."""
    if not values:
        return MISSING
    if len(values) == 1:
        return format_number(values[0], MISSING)
    return f"{format_number(statistics.fmean(values))} ± {format_number(statistics.stdev(values))}"


def group_table(runs: Sequence[PointRun]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the per-group table: mean ± std over seeds, n = points with data."""
    header = ["overrides", "n", *COLUMNS]
    rows = []
    for label, members in group_runs(runs):
        per_point = [point_values(r) for r in members]
        with_data = sum(v["best val loss"] is not None for v in per_point)
        cells = [fmt_mean_std([v[c] for v in per_point if v[c] is not None]) for c in COLUMNS]
        rows.append([label, f"{with_data}/{len(members)}", *cells])
    return header, rows


def point_table(runs: Sequence[PointRun]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the per-point table."""
    header = ["point", "status", *COLUMNS]
    rows = []
    for run in runs:
        values = point_values(run)
        rows.append([run.name, run.status, *(format_number(values[c], MISSING) for c in COLUMNS)])
    return header, rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def build_markdown(sweep_dir: str, runs: Sequence[PointRun]) -> str:
    finished = sum(r.summary is not None for r in runs)
    return "\n".join([
        f"# Sweep comparison: {os.path.abspath(sweep_dir)}", "",
        f"{finished} of {len(runs)} points finished. Groups are points whose overrides differ only in "
        f"`{SEED_KEY}`: mean ± sample std over seeds, n = points with a val loss / points. "
        "Accuracies, the gradient ratio and mask accuracy are the last logged values; "
        "tokens/s is the mean over the run; alerts counts alert starts. "
        f"{MISSING} = not logged (e.g. the AR baseline has no diffusion metrics).", "",
        "## By group", "", markdown_table(*group_table(runs)), "",
        "## By point", "", markdown_table(*point_table(runs)), "",
    ])


# --- plots and the page -----------------------------------------------------------------------


def _styles(runs: Sequence[PointRun]) -> dict[str, tuple[Any, str]]:
    """(colour, linestyle) per point: one colour per group, one line style per seed."""
    groups = group_runs(runs)
    palette = report.COLORS
    styles = {}
    for g, (_, members) in enumerate(groups):
        for i, run in enumerate(members):
            styles[run.name] = (palette[g % len(palette)], _LINESTYLES[i % len(_LINESTYLES)])
    return styles


def plot_curves(title: str, metric: str, runs: Sequence[PointRun]) -> str | None:
    """One metric of every point overlaid, as a base64 PNG; None if no point logged it."""
    styles = _styles(runs)
    fig = Figure(figsize=(6.4, 3.8), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for run in runs:
        pts = [(s, v) for s, v in metric_points(run.history, metric) if math.isfinite(v)]
        if pts:
            xs, ys = zip(*pts)
            color, style = styles[run.name]
            ax.plot(xs, ys, linestyle=style, color=color, marker="o", markersize=3, linewidth=1.4, label=run.name)
    if not ax.lines:
        return None
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return report.png_base64(fig)


def html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td{" class=num" if i > 0 else ""}>{escape(c)}</td>'
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def build_html(sweep_dir: str, runs: Sequence[PointRun]) -> str:
    figures = []
    for title, metric in CURVES:
        png = plot_curves(title, metric, runs)
        if png is not None:
            figures.append(f'<figure><img alt="{escape(title)}" src="data:image/png;base64,{png}">'
                           f"<figcaption><code>{escape(metric)}</code></figcaption></figure>")
    curves = f'<div class="grid">{"".join(figures)}</div>' if figures else '<p class="note">no metrics yet</p>'
    finished = sum(r.summary is not None for r in runs)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>tdlm_jax sweep: {escape(sweep_dir)}</title>
<style>{CSS}.grid {{ grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); }}</style></head><body>
<h1>tdlm_jax sweep comparison</h1>
<p class="meta"><b>{escape(os.path.abspath(sweep_dir))}</b> · {finished} of {len(runs)} points finished</p>
<p class="meta">Groups: points whose overrides differ only in <code>{SEED_KEY}</code>, mean ± sample std
over seeds. Colour = group, line style = seed. {MISSING} = not logged.</p>
<h2>By group</h2>{html_table(*group_table(runs))}
<h2>By point</h2>{html_table(*point_table(runs))}
<h2>Curves</h2>{curves}
</body></html>
"""


def write_comparison(sweep_dir: str) -> tuple[str, str]:
    """Writes comparison.md and comparison.html in `sweep_dir`; returns their paths."""
    runs = [load_point(*p) for p in sweep_points(sweep_dir)]
    paths = (os.path.join(sweep_dir, "comparison.md"), os.path.join(sweep_dir, "comparison.html"))
    for path, text in zip(paths, (build_markdown(sweep_dir, runs), build_html(sweep_dir, runs))):
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)  # a browser or reader never sees half a file
    return paths
