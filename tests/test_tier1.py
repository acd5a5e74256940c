"""Tier 1's definitions (README, "Tier 1") on a real run: each row is the mean of its logging
interval's steps, `train/grad_norm` is the gradient's norm before clipping, the learning
rate is the schedule's, and throughput leaves evaluation out."""

import dataclasses
import pathlib
import runpy
import time

import jax
import numpy as np
import pytest

from tdlm_jax.metrics import jsonl
from tdlm_jax.training import loop, programs

REPO = pathlib.Path(__file__).resolve().parents[1]
INTERVAL = 4
MEANS = ("train/loss", "train/learning_rate", "train/grad_norm", "metrics/mask_accuracy",
         "metrics/total_masked_tokens", "metrics/valid_ratio")
EVAL_SECONDS = 2.0


def tiny_config():
    config = runpy.run_path(str(REPO / "configs" / "tiny.py"))["get_config"]()
    config.training.update(num_steps=3 * INTERVAL, logging_steps=INTERVAL, eval_every_n_steps=2 * INTERVAL,
                           detailed_metrics_steps=100, attention_analysis_steps=100, checkpoint_every_n_steps=100,
                           grad_clip_norm=1e-3,  # every update is clipped
                           decay_schedule="cosine")  # base.py's, which tiny.py leaves out
    config.sampling.num_samples_at_eval = 0
    return config


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """(config, each step's metrics as the train step returned them, the run's tier-1 rows);
    each evaluation is made EVAL_SECONDS slower."""
    config, steps = tiny_config(), []
    real_compile, real_evaluate = programs.compile_programs, loop.evaluate

    def compile_programs(*args, **kwargs):
        compiled = real_compile(*args, **kwargs)
        train_step = compiled[programs.TRAIN].compiled  # the program the loop calls

        def recording_step(*args):
            state, metrics = train_step(*args)
            steps.append(jax.device_get(metrics))
            return state, metrics

        compiled[programs.TRAIN] = dataclasses.replace(compiled[programs.TRAIN], compiled=recording_step)
        return compiled

    def slow_evaluate(*args):
        time.sleep(EVAL_SECONDS)
        return real_evaluate(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(programs, "compile_programs", compile_programs)
        patch.setattr(loop, "evaluate", slow_evaluate)
        workdir = tmp_path_factory.mktemp("tier1") / "run"
        loop.train(config, str(workdir))
    rows = [r for r in jsonl.read(workdir / "metrics.jsonl") if "train/loss" in r]
    return config, steps, rows


def test_each_row_is_the_mean_of_its_interval(recorded):
    _, steps, rows = recorded
    assert [r["step"] for r in rows] == [INTERVAL, 2 * INTERVAL, 3 * INTERVAL] and len(steps) == 3 * INTERVAL
    for i, row in enumerate(rows):
        interval = steps[i * INTERVAL:(i + 1) * INTERVAL]
        for name in MEANS:
            assert row[name] == pytest.approx(np.mean([float(s[name]) for s in interval]), rel=1e-6), name
    assert len({r["train/loss"] for r in rows}) == 3  # not one step's value repeated


def test_the_gradient_norm_is_measured_before_clipping(recorded):
    config, _, rows = recorded
    # Clipping to 1e-3 bounds every update, not the logged norm of the raw gradient.
    assert min(r["train/grad_norm"] for r in rows) > 100 * config.training.grad_clip_norm


def test_the_learning_rate_is_the_schedule_s(recorded):
    """Linear warm-up from 0, then cosine down to min_learning_rate_ratio of the peak (base.py's
    schedule), written out here: step k + 1 applies the rate at k."""
    config, steps, _ = recorded
    tc = config.training
    assert tc.decay_schedule == "cosine"
    peak, warmup, decay_steps, floor = tc.learning_rate, tc.warmup_steps, tc.num_steps - tc.warmup_steps, \
        tc.min_learning_rate_ratio
    k = np.arange(tc.num_steps)
    cosine = peak * ((1 - floor) * 0.5 * (1 + np.cos(np.pi * np.clip(k - warmup, 0, decay_steps) / decay_steps))
                     + floor)
    expected = np.where(k < warmup, peak * k / warmup, cosine)
    np.testing.assert_allclose([float(s["train/learning_rate"]) for s in steps], expected, rtol=1e-5, atol=1e-9)


def test_throughput_leaves_evaluation_out(recorded):
    config, _, rows = recorded
    tokens_per_interval = INTERVAL * config.training.batch_size * config.data.seq_len
    # The step-8 evaluation (EVAL_SECONDS long) runs after step 8's row is taken, inside the
    # interval that ends at step 12: counted, it would cap that interval's throughput at this.
    with_evaluation = tokens_per_interval / EVAL_SECONDS
    assert rows[2]["train/tokens_per_second"] > 3 * with_evaluation
    assert rows[2]["train/tokens_per_second"] > rows[1]["train/tokens_per_second"] / 3  # like its neighbour
