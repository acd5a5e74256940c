"""The HTML run report: rendering from synthetic workdirs, and the verdict functions."""

from __future__ import annotations

import base64
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from tdlm_jax.analysis import run_report
from tdlm_jax.analysis import verdicts as v

CONFIG = {
    "diffusion": {"loss_weighting": "elbo", "schedule": "linear"},
    "metrics": {"bucket_edges": [0.0, 0.3, 0.7, 1.0]},
    "training": {"num_steps": 1000, "logging_steps": 100, "detailed_metrics_steps": 500,
                 "attention_analysis_steps": 2000, "eval_every_n_steps": 100},
}


def tier1_rows(steps: range) -> list[dict]:
    """A learning run: loss falls, accuracy rises, masked-token counts vary."""
    rows = []
    for i, step in enumerate(steps):
        rows.append({"step": step, "train/loss": 3.5 - 0.15 * i, "train/learning_rate": 1e-3,
                     "train/grad_norm": 1.0 - 0.05 * i, "train/tokens_per_second": 1e4 + 10 * i,
                     "metrics/mask_accuracy": 0.15 + 0.03 * i, "metrics/total_masked_tokens": 2090 + i % 3,
                     "metrics/valid_ratio": 1.0})
        rows.append({"step": step, "val/loss": 3.4 - 0.15 * i, "val/perplexity": 30.0 - i,
                     "val/bits_per_token": 4.9 - 0.2 * i, "val/mask_accuracy": 0.16 + 0.03 * i})
    return rows


def research_row(step: int) -> dict:
    row = {"step": step, "research/weight_difficulty_correlation": -0.3, "research/avg_loss_weight": 2.0,
           "research/weight_std": 2.1, "research/avg_prediction_difficulty": 0.7,
           "research/gradient_norm_total": 0.7, "research/gradient_norm_ratio_high_to_low": 0.4}
    for bucket, acc, grad in (("low", 0.5, 0.5), ("medium", 0.35, 0.4), ("high", 0.2, 0.2)):
        row.update({f"research/{bucket}_corruption_accuracy": acc,
                    f"research/{bucket}_corruption_count": 10.0,
                    f"research/{bucket}_corruption_loss": 0.8,
                    f"research/gradient_norm_{bucket}_corruption": grad})
    return row


def write_workdir(path, rows: list[dict], alerts: list[dict] | None = None, config: dict | None = CONFIG,
                  tail: str = "") -> str:
    with open(path / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
        f.write(tail)
    if alerts is not None:
        with open(path / "alerts.jsonl", "w") as f:
            f.writelines(json.dumps(a) + "\n" for a in alerts)
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return str(path)


ALERTS = [
    {"step": 300, "rule": "grad_norm_spike", "event": "start", "values": {"train/grad_norm": 9.5},
     "message": "gradient norm 9.5 above 5", "meaning": "the update may be unstable"},
    {"step": 500, "rule": "grad_norm_spike", "event": "clear", "values": {"train/grad_norm": 0.8},
     "message": "gradient norm back to 0.8", "meaning": "the update may be unstable"},
]


def without_images(page: str) -> str:
    return re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)


@pytest.fixture(scope="module")
def full_page(tmp_path_factory) -> tuple[str, set[str]]:
    """The report of a workdir with every tier, an alert, and a torn last line."""
    path = tmp_path_factory.mktemp("full")
    rows = tier1_rows(range(100, 1100, 100)) + [research_row(500), research_row(1000)]
    rows.append({"step": 1000, "advanced/hidden_state_norm": 3.0,
                 **{f"advanced/attention_entropy/layer_{i}": 2.0 - 0.1 * i for i in (0, 1, 10)}})
    workdir = write_workdir(path, rows, ALERTS, tail='{"step": 1100, "train/lo')
    names = {k for row in rows for k in row if k != "step"}
    return run_report.build_report(workdir), names


def test_report_has_every_metric_tier_and_alert(full_page):
    page, names = full_page
    for name in names:
        assert name in page, name
    for title in ("Tier 1: Essential", "Tier 2: Research", "Tier 3: Advanced", "Verdicts", "Config"):
        assert title in page
    assert "no data yet" not in page
    for text in ("grad_norm_spike", "gradient norm 9.5 above 5", "the update may be unstable"):
        assert text in page
    assert "skipped 1 unreadable line" in page  # the torn line of a live run


def test_report_is_self_contained(full_page):
    page, _ = full_page
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(images) == page.count("<figure")
    assert base64.b64decode(images[0])[:4] == b"\x89PNG"
    rest = without_images(page)
    assert "http" not in rest
    assert all(src.startswith("data:") for src in re.findall(r'src="([^"]*)"', page))
    assert all(href.startswith("#") for href in re.findall(r'href="([^"]*)"', page))
    assert "<script" not in rest and "<link" not in rest and "@import" not in rest and "url(" not in rest


def test_samples_show_the_latest_in_full_and_sample_0_over_training(tmp_path):
    workdir = write_workdir(tmp_path, tier1_rows(range(100, 300, 100)))
    with open(tmp_path / "samples.jsonl", "w") as f:
        for step in range(100, 2100, 100):
            for index in (1, 0):
                text = f"ROMEO: <b>step {step}</b> sample {index}\nsecond line " + "x" * 300 * (step == 2000)
                f.write(json.dumps({"step": step, "index": index, "sampler": "ancestral", "steps": 64,
                                    "prompt": "ROMEO:", "nfe": 60, "text": text}) + "\n")
    page = run_report.build_report(workdir)
    section = page[page.index('<section id="samples">'):].split("</section>")[0]
    assert "Latest: step 2000" in section and "ancestral, 64 steps, 60 denoiser calls" in section
    for index in (0, 1):  # the latest evaluation's samples, whole and escaped
        assert f"ROMEO: &lt;b&gt;step 2000&lt;/b&gt; sample {index}\nsecond line " + "x" * 300 in section
    evolution = section.split("Sample 0 over training")[1]
    steps = [int(m) for m in re.findall(r'<td class="num">(\d+)</td>', evolution)]
    assert steps == [100, 300, 400, 600, 800, 1000, 1100, 1300, 1500, 1700, 1800, 2000]  # evenly spread
    assert "sample 1" not in evolution and evolution.count("…") == 1  # sample 0's 200 first characters
    assert "<b>" not in section


def test_a_run_without_samples_says_so(tmp_path):
    page = run_report.build_report(write_workdir(tmp_path, tier1_rows(range(100, 300, 100))))
    assert "no samples yet (no samples.jsonl in the workdir" in page


def test_grouped_panels():
    names = ["research/high_corruption_accuracy", "research/low_corruption_accuracy",
             "research/medium_corruption_accuracy", "research/gradient_norm_medium_corruption",
             "research/gradient_norm_low_corruption", "research/gradient_norm_high_corruption",
             "advanced/attention_entropy/layer_10", "advanced/attention_entropy/layer_2",
             "advanced/attention_entropy",
             "val/loss", "train/loss", "metrics/mask_accuracy", "research/weight_std"]
    panels = {p.title: p for p in run_report.group_panels(names)}
    assert len(panels) == 6
    accuracy = panels["research/{low,medium,high}_corruption_accuracy"]
    assert [label for _, label in accuracy.series] == ["low", "medium", "high"]
    assert [label for _, label in panels["research/gradient_norm_{low,medium,high}_corruption"].series] == \
        ["low", "medium", "high"]
    entropy = panels["advanced/attention_entropy/layer_{i}"]
    assert [label for _, label in entropy.series] == ["mean", "layer 2", "layer 10"]
    assert [label for _, label in panels["{train,val}/loss"].series] == ["train", "val"]
    assert [p.title for p in run_report.group_panels(names)][0] == "{train,val}/loss"


def test_alerts_attach_to_the_panels_they_name():
    history = run_report.build_history(tier1_rows(range(100, 600, 100)))
    panels = {p.title: p for p in run_report.group_panels(list(history))}
    assert run_report.alerts_for(panels["train/grad_norm"], ALERTS) == ALERTS
    assert run_report.alerts_for(panels["{train,val}/loss"], ALERTS) == []
    png = run_report.plot_panel(panels["train/grad_norm"], history, ALERTS)
    assert base64.b64decode(png)[:4] == b"\x89PNG"


def test_tier1_only_run_in_progress(tmp_path):
    workdir = write_workdir(tmp_path, tier1_rows(range(100, 400, 100)))
    page = run_report.build_report(workdir)
    assert "no data yet (logged every 500 steps: training.detailed_metrics_steps)" in page
    assert "no data yet (logged every 2000 steps: training.attention_analysis_steps)" in page
    assert "this run has 1000 steps, fewer than that interval" in page
    assert "not finished" in page and "last logged step 300 of 1000" in page
    assert "no alerts (no alerts.jsonl in the workdir)" in page
    assert "no summary yet" in page


def test_empty_workdir_and_non_finite_values(tmp_path):
    page = run_report.build_report(write_workdir(tmp_path, [], config=None))
    assert "no metrics yet" in page and "config.json not found" in page
    assert page.count(v.NO_DATA) >= 2
    rows = tier1_rows(range(100, 500, 100))
    rows[2]["train/loss"] = float("nan")  # json.dumps writes NaN; the trainer writes "NaN"
    rows[4]["train/loss"] = "Infinity"
    page = run_report.build_report(write_workdir(tmp_path, rows))
    assert "non-finite train/loss at step 200" in page
    assert "2 non-finite" not in page  # drawn as a note on the plot, not as text


def test_unreadable_lines_are_counted_not_fatal(tmp_path):
    """A binary file, a JSON list, a non-integer step or a text value: notes, not tracebacks."""
    workdir = pathlib.Path(write_workdir(tmp_path, tier1_rows(range(100, 400, 100))))
    with open(workdir / "metrics.jsonl", "ab") as f:
        f.write(b'[1, 2]\n{"step": "abc", "train/loss": 1.0}\n{"step": 400, "val/loss": "low"}\n\x00\xff\xfe\x93\n')
    page = run_report.build_report(workdir)
    assert "metrics.jsonl: skipped 3 unreadable line(s)" in page
    (workdir / "metrics.jsonl").write_bytes(bytes(range(256)) * 40)  # not text at all
    assert "unreadable line(s)" in run_report.build_report(workdir)


def test_cli_writes_the_report(tmp_path):
    rows = tier1_rows(range(100, 300, 100)) + [{"step": 200, "summary/total_steps": 200}]
    workdir = write_workdir(tmp_path, rows)
    result = subprocess.run([sys.executable, "-m", "tdlm_jax.report", f"--workdir={workdir}"],
                            capture_output=True, text=True, check=True)
    path = result.stdout.strip()
    assert path == os.path.join(workdir, "report.html")
    with open(path, encoding="utf-8") as f:
        page = f.read()
    assert "finished: 200 of 1000 steps" in page and "summary/total_steps" in page
    bad = subprocess.run([sys.executable, "-m", "tdlm_jax.report", f"--workdir={tmp_path / 'nope'}"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "is not a directory" in bad.stderr


# --- verdicts ---------------------------------------------------------------------------


def good_history() -> v.History:
    return run_report.build_history(tier1_rows(range(100, 1100, 100)) + [research_row(500), research_row(1000)])


def test_good_run_is_healthy():
    history = good_history()
    forward, reverse = v.forward_process_verdict(history), v.reverse_process_verdict(history)
    assert forward.status == v.HEALTHY, forward.checks
    assert reverse.status == v.HEALTHY, reverse.checks
    assert forward.headline == "healthy"


def test_tier1_only_verdicts_say_what_is_missing():
    history = run_report.build_history(tier1_rows(range(100, 400, 100)))
    forward = v.forward_process_verdict(history)
    assert forward.status == v.HEALTHY  # valid_ratio and masked tokens are already checkable
    assert [c.status for c in forward.checks[:2]] == [v.NO_DATA, v.NO_DATA]
    assert v.forward_process_verdict({}).status == v.NO_DATA
    assert v.reverse_process_verdict({}).headline == v.NO_DATA


def test_forward_process_warnings():
    inverted = {f"research/{b}_corruption_accuracy": [(500, a)]
                for b, a in (("low", 0.5), ("medium", 0.3), ("high", 0.4))}
    assert v.check_bucket_accuracy_order(inverted).status == v.WARNING
    assert "high 40.0% > medium 30.0%" in v.check_bucket_accuracy_order(inverted).reason
    zero = {**inverted, "research/high_corruption_accuracy": [(500, 0.0)]}
    assert "is 0" in v.check_bucket_accuracy_order(zero).reason
    empty = {f"research/{b}_corruption_count": [(500, c), (1000, c)]
             for b, c in (("low", 0.0), ("medium", 20.0), ("high", 12.0))}
    assert v.check_bucket_counts(empty).status == v.WARNING
    assert v.check_valid_ratio({"metrics/valid_ratio": [(100, 1.0), (200, 0.6)]}).status == v.WARNING
    constant = {"metrics/total_masked_tokens": [(s, 2048.0) for s in (100, 200, 300)]}
    assert v.check_masked_tokens_vary(constant).status == v.WARNING
    verdict = v.forward_process_verdict({**inverted, **constant})
    assert verdict.status == v.WARNING and verdict.headline.startswith("warning: unnatural ordering")


def test_reverse_process_warnings():
    steps = range(100, 1100, 100)
    falling_acc = {"metrics/mask_accuracy": [(s, 0.5 - 0.01 * i) for i, s in enumerate(steps)]}
    assert "not increasing" in v.check_mask_accuracy_trend(falling_acc).reason
    flat_low = {"metrics/mask_accuracy": [(s, min(0.3, 0.1 + 0.05 * i)) for i, s in enumerate(steps)]}
    assert "stagnating below 40.0%" in v.check_mask_accuracy_trend(flat_low).reason
    spike = {"train/loss": [(s, x) for s, x in zip(steps, (3.0, 2.8, 2.6, 3.6, 2.4, 2.3))]}
    assert "spike at step 400" in v.check_train_loss_trend(spike).reason
    train = [(s, 3.0 - 0.2 * i) for i, s in enumerate(steps)]
    overfit = {"train/loss": train, "val/loss": [(s, 2.5 + 0.05 * abs(i - 4)) for i, s in enumerate(steps)]}
    assert "overfitting" in v.check_val_tracks_train(overfit).reason
    gap = {"train/loss": train, "val/loss": [(s, x + 0.6) for s, x in train]}
    assert "large gap" in v.check_val_tracks_train(gap).reason
    assert v.check_val_tracks_train(gap, loss_weighting="uniform").status == v.HEALTHY
    grads = {f"research/gradient_norm_{b}_corruption": [(500, g)]
             for b, g in (("low", 0.5), ("medium", 0.4), ("high", 0.001))}
    reason = v.check_gradient_balance(grads).reason
    assert "vanishing high-corruption gradient" in reason and "extreme ratio" in reason
    assert v.reverse_process_verdict({**falling_acc, **grads}).status == v.WARNING


def test_report_of_a_real_tiny_run(tmp_path):
    """End to end on the trainer's own files (configs/tiny.py trains 8 steps in ~10 s)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    workdir = str(tmp_path / "tiny")
    command = [sys.executable, "-m", "tdlm_jax.main", f"--config={repo}/configs/tiny.py", f"--workdir={workdir}"]
    subprocess.run(command, cwd=repo, capture_output=True, text=True, check=True, timeout=120)
    page = run_report.build_report(workdir)
    assert "finished: 8 of 8 steps" in page
    for name in ("train/loss", "val/loss", "metrics/mask_accuracy", "metrics/valid_ratio",
                 "research/{low,medium,high}_corruption_accuracy", "research/gradient_norm_ratio_high_to_low",
                 "summary/best_val_loss", "training.num_steps"):
        assert name in page, name
    assert page.count("<figure") >= 15
    assert "Latest: step 8" in page and "ROMEO:" in page  # samples.jsonl's rows
    assert "http" not in without_images(page)
