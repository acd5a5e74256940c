"""The console (tdlm_jax.metrics.console): short lines with known values, the progress fields
with a controlled clock, and the progress bar on a terminal."""

import io

import pytest
from absl import logging

from tdlm_jax.metrics import console as console_lib
from tdlm_jax.metrics.formatting import duration, thousands

TRAIN_ROW = {"train/loss": 2.913, "train/learning_rate": 1.9e-3, "train/grad_norm": 0.83,
             "metrics/mask_accuracy": 0.412, "metrics/total_masked_tokens": 2094.07,
             "train/tokens_per_second": 12_700.0}


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def logged(monkeypatch):
    lines = []
    monkeypatch.setattr(logging, "info", lambda msg, *args: lines.append(msg % args if args else msg))
    return lines


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(console_lib.time, "perf_counter", lambda: now[0])
    return now


def test_a_logging_step_is_one_short_line_with_progress(logged, clock):
    console = console_lib.Console(1200, 0, terminal=False)
    clock[0] += 100.0  # 300 steps in 100 s: 3 steps/s, 900 to go: 300 s
    console.write_scalars(300, TRAIN_ROW)
    assert logged == ["step 300/1200 25% | loss 2.9130 | mask_acc 0.4120 | grad_norm 0.8300 | "
                      "3.00 step/s | ETA 5m00s | 12.7k tok/s"]
    console.write_scalars(300, {"val/loss": 2.518, "val/perplexity": 12.4036, "val/mask_accuracy": 0.452})
    clock[0] += 50.0  # the rate is over the steps since the last line
    console.write_scalars(400, TRAIN_ROW)
    assert logged[1] == "eval step 300 | val/loss 2.5180 | perplexity 12.4036 | mask_acc 0.4520"
    assert logged[2] == ("step 400/1200 33% | loss 2.9130 | mask_acc 0.4120 | grad_norm 0.8300 | val 2.5180 | "
                         "2.00 step/s | ETA 6m40s | 12.7k tok/s")
    clock[0] += 10.0
    console.write_scalars(1200, TRAIN_ROW)  # the last step: no ETA
    assert logged[3].startswith("step 1200/1200 100% |") and "ETA" not in logged[3]


def test_research_samples_summary_and_other_rows(logged):
    console = console_lib.Console(1200, 0, terminal=False)
    research = {f"research/{b}_corruption_loss": v for b, v in zip(("low", "medium", "high"), (0.41, 1.92, 3.87))}
    research.update({"research/low_corruption_accuracy": None, "research/medium_corruption_accuracy": 0.5,
                     "research/high_corruption_accuracy": 0.25, "research/high_corruption_count": 10.0})
    console.write_scalars(500, research)
    console.write_texts(500, {"samples/0": "ROMEO:\nTo be\n  or not", "samples/1": "x", "alerts/rule": "logged"})
    console.write_scalars(1200, {"summary/total_steps": 1200.0, "summary/final_loss": 2.118,
                                 "summary/best_val_loss": None, "summary/training_time_hours": 245 / 3600,
                                 "alerts/total": 0})
    console.write_scalars(7, {"other/tokens_seen": 10.0, **{f"k{i}": 1.5 for i in range(9)}})
    assert logged[0] == ("research step 500 (buckets low/med/high) | loss 0.4100/1.9200/3.8700 | "
                         "mask_acc n/a/0.5000/0.2500")
    assert logged[1] == "samples at step 500:\n  [0] ROMEO:\n      To be\n        or not\n  [1] x"
    assert logged[2] == ("run summary (all of it in summary.json):\n  steps             1200\n"
                         "  final train loss  2.1180\n  best val loss     n/a\n  training time     4m05s\n"
                         "  health alerts     0")
    assert logged[3].startswith("step 7 | other/tokens_seen 10.0000 | k0 1.5000") and "(+2 more in metrics.jsonl)" in logged[3]


def test_the_config_line_names_what_a_person_checks_first(logged):
    console_lib.Console(0, terminal=False).write_hparams(
        {"model": {"kind": "diffusion", "num_layers": 4, "d_model": 128, "num_heads": 4},
         "data": {"source": "shakespeare", "tokenizer": "byte", "seq_len": 128},
         "training": {"batch_size": 32, "num_steps": 1200, "learning_rate": 0.002}})
    assert logged == ["config: diffusion model 4×128 (4 heads) | data shakespeare (byte, seq_len 128) | "
                      "batch 32 × 1200 steps, lr 0.002 (all settings in config.json)"]


def test_a_terminal_gets_a_progress_bar_with_the_latest_figures(logged):
    stream = Terminal()
    console = console_lib.Console(40, 10, stream=stream)  # resumed at step 10
    with console.compiling("the train step"):  # before the first step: a plain line
        pass
    for step in range(11, 31):
        console.advance(step)
        if step == 20:
            console.write_scalars(step, TRAIN_ROW)
            console.write_scalars(step, {"val/loss": 2.5})
    console.flush()
    console.close()
    out = stream.getvalue()
    assert logged[0] == "compiling the train step…" and logged[1].startswith("the train step ready in")
    assert "30/40" in out and " 75%|" in out  # step/total and %, counted from the resumed step
    assert "loss 2.9130 acc 0.4120 tok/s 12.7k val 2.5000" in out
    assert "\rstep 20/40 50% | loss 2.9130" in out  # lines go above the bar, not into the log
    assert len(logged) == 2


@pytest.mark.parametrize("seconds, text", [(12.4, "12s"), (290, "4m50s"), (3900, "1h05m")])
def test_duration(seconds, text):
    assert duration(seconds) == text


@pytest.mark.parametrize("value, text", [(None, "n/a"), (950.0, "950"), (12_700.0, "12.7k"), (3.2e6, "3.2M")])
def test_thousands(value, text):
    assert thousands(value) == text
