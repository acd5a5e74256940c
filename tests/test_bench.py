"""The benchmark: each mode on configs/tiny.py, checked for consistency (never for speed)."""

import json
import os
import pathlib
import runpy
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import pytest

from tdlm_jax import bench
from tdlm_jax.errors import ConfigError
from tdlm_jax.model import flops
from tdlm_jax.training import benchmark, dot_bound

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.py"
SMALL_MATMUL = (128, jnp.float32, 1)  # the CPU peak's matmul, kept small: only consistency is checked


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    config = runpy.run_path(str(TINY))["get_config"]()
    config.data.cache_dir = str(tmp_path_factory.mktemp("token_cache"))  # for the data mode
    return benchmark.build_setup(config)


def test_train_mode_reports_consistent_numbers(setup, capsys):
    r = benchmark.run_train(setup, steps=1, repeats=2, matmul=SMALL_MATMUL)
    assert r["tokens_per_step"] == 8 * 32
    assert r["flops_per_token"] == flops.train_flops_per_token(setup.model_cfg, 32) == 197_184  # tests/test_flops.py
    assert r["tokens_per_second"] == pytest.approx(r["tokens_per_step"] / r["step_seconds"])
    assert r["model_flops_per_second"] == pytest.approx(r["flops_per_token"] * r["tokens_per_second"])
    assert r["mfu"] == pytest.approx(r["flops_per_token"] * r["tokens_per_second"] / r["peak_flops_per_second"])
    assert r["peak_source"].startswith("measured f32 matmul")  # CPU: measured, not from the table
    assert r["step_seconds"] == pytest.approx(sorted(r["step_seconds_by_repeat"])[0] / 2
                                              + sorted(r["step_seconds_by_repeat"])[1] / 2)  # median of 2
    assert r["peak_flops_per_second"] == max(r["matmul_flops_per_second_by_repeat"])  # the best repeat
    by_layout = r["matmul_flops_per_second_by_layout"]
    assert set(by_layout) == set(benchmark.MATMUL_LAYOUTS)  # both layouts timed, each repeat's faster one counts
    assert r["matmul_flops_per_second_by_repeat"] == [max(rates) for rates in zip(*by_layout.values())]
    paired = [r["flops_per_token"] * 256 / step / rate
              for step, rate in zip(r["step_seconds_by_repeat"], r["matmul_flops_per_second_by_repeat"])]
    assert r["mfu_paired_median"] == pytest.approx(sum(paired) / 2)
    # XLA's count of the compiled step adds elementwise work, the loss and the optimizer.
    assert 1.0 <= r["xla_flops_per_token"] / r["flops_per_token"] < 1.3
    bench.print_train(r)
    printed = capsys.readouterr().out
    assert f"{100 * r['mfu']:10.1f} %" in printed and "N = 28,768 matmul params" in printed


def test_tiers_mode_ratios_are_quotients_of_the_step_times(setup, capsys):
    r = benchmark.run_tiers(setup, steps=1, repeats=2)
    assert all(r[f"{name}_seconds"] > 0 for name in ("bare", "ordinary", "detailed", "analysis"))
    assert r["tier1_ratio"] == pytest.approx(r["ordinary_seconds"] / r["bare_seconds"])
    assert r["tier2_ratio"] == pytest.approx(r["detailed_seconds"] / r["bare_seconds"])
    assert r["tier3_ratio"] == pytest.approx(r["analysis_seconds"] / r["bare_seconds"])
    bench.print_tiers(r)
    assert f"analysis / bare = {r['tier3_ratio']:.3f}" in capsys.readouterr().out


def test_data_mode_compares_the_pipeline_with_the_step(setup, tmp_path):
    r = benchmark.run_data(setup, steps=1, repeats=1, num_batches=3, workdir=str(tmp_path))
    assert r["pipeline"]["num_batches"] == 3 and r["pipeline"]["tokens_per_batch"] == 8 * 32
    assert r["pipeline_tokens_per_second"] > 0 and r["step_tokens_per_second"] > 0
    assert r["pipeline_to_step_ratio"] == pytest.approx(r["pipeline_tokens_per_second"] / r["step_tokens_per_second"])


def test_round_robin_warms_up_once_then_times_every_repeat():
    calls = {"a": 0, "b": 0}

    def variant(name):
        def run():
            calls[name] += 1
            return jnp.zeros(())
        return run

    seconds = benchmark.time_round_robin({"a": variant("a"), "b": variant("b")}, steps=3, repeats=4)
    assert calls == {"a": 1 + 3 * 4, "b": 1 + 3 * 4}
    assert [len(seconds["a"]), len(seconds["b"])] == [4, 4] and min(seconds["a"] + seconds["b"]) > 0


@pytest.mark.parametrize("kind, name, peak", [
    ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM", 989e12),
    ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", "NVIDIA H100 NVL", 835e12),
    ("NVIDIA H800 PCIe", "NVIDIA H800 PCIe", 756e12),  # once took the H100 SXM figure
    ("NVIDIA H800", "NVIDIA H800 SXM", 989e12),
    ("NVIDIA H200", "NVIDIA H200 SXM", 989e12),
    ("NVIDIA GH200 480GB", "NVIDIA GH200", 989e12),
    ("NVIDIA A100-SXM4-80GB", "NVIDIA A100", 312e12),
    ("NVIDIA L4", "NVIDIA L4", 121e12),
    ("NVIDIA L40S", "NVIDIA L40S", 362e12),
    ("TPU v4", "TPU v4", 275e12),
    ("TPU v5 lite", "TPU v5e", 197e12),
    ("TPU v5", "TPU v5p", 459e12),
    ("TPU v6 lite", "TPU v6e", 918e12),
])
def test_known_devices_have_their_bf16_dense_peak(kind, name, peak):
    assert benchmark.known_peak(kind) == (name, peak)


def test_every_device_peak_entry_names_itself():
    """Each entry of the peak table is reached by its own name: a PCIe or NVL part cannot fall
    into an SXM entry listed before it."""
    for _, name, peak in benchmark.DEVICE_PEAKS:
        assert benchmark.known_peak(name) == (name, peak)


def test_peak_choice_table_measured_or_override():
    h100 = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
    unknown = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA GeForce RTX 4090")
    cpu = types.SimpleNamespace(platform="cpu", device_kind="cpu")
    assert benchmark.known_peak("NVIDIA GeForce RTX 4090") is None and benchmark.known_peak("cpu") is None
    assert benchmark.peak_for_device(h100, 8, None).flops_per_second == 8 * 989e12
    fallback = benchmark.peak_for_device(unknown, 2, lambda: 100e12)
    assert fallback.flops_per_second == 200e12 and "not in the table" in fallback.source
    assert benchmark.peak_for_device(cpu, 4, lambda: 3e11).flops_per_second == 3e11  # fake devices share the cores
    assert benchmark.peak_for_device(h100, 2, None, override_tflops=500).flops_per_second == 1000e12
    with pytest.raises(ConfigError, match="peak_tflops"):
        benchmark.peak_for_device(unknown, 1, None)


def test_matmul_peak_counts_its_flops_and_computes_its_layouts_product():
    for layout in benchmark.MATMUL_LAYOUTS:
        run, matmul_flops = benchmark.matmul_fn(64, jnp.float32, 3, layout)
        assert matmul_flops == 3 * 2 * 64 ** 3
        out = run()
        assert out.shape == (64, 64) and bool(jnp.all(jnp.isfinite(out)))
    a, b = jnp.array([[0.0, 1.0], [2.0, 3.0]]), jnp.array([[1.0, 2.0], [3.0, 5.0]])
    assert benchmark.layout_product(a, b, "a @ b").tolist() == [[3.0, 5.0], [11.0, 19.0]]
    assert benchmark.layout_product(a, b, "aT @ b").tolist() == [[6.0, 10.0], [10.0, 17.0]]  # first axes contracted


def test_command_line_prints_the_train_figures_and_appends_them_as_json(tmp_path):
    record_file = tmp_path / "figures.jsonl"
    record_file.write_text('{"earlier": "line"}\n')  # appended to, never overwritten
    result = subprocess.run([sys.executable, "-m", "tdlm_jax.bench", f"--config={TINY}", "--steps=1", "--repeats=1",
                             "--config.training.batch_size=4", f"--json={record_file}"],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-2000:]
    for line in ("step time", "tokens/s", "FLOPs/token", "1.972e+05", "peak", "MFU", "xla attention"):
        assert line in result.stdout, result.stdout
    earlier, record = map(json.loads, record_file.read_text().splitlines())
    assert earlier == {"earlier": "line"}
    assert record["config"] == str(TINY) and record["overrides"] == ["--config.training.batch_size=4"]
    assert record["mode"] == "train" and record["platform"] == "cpu" and record["device_count"] == 4
    assert record["setup"] in result.stdout and record["setup"].startswith("batch 4 x 32")
    figures = record["figures"]
    assert figures["flops_per_token"] == 197_184 and figures["tokens_per_step"] == 4 * 32
    assert f"{100 * figures['mfu']:10.1f} %" in result.stdout


def test_dot_flops_and_counts_through_jit_scan_and_cond():
    def f(a, b, flag):
        inner = jax.jit(lambda x: x @ b)  # [2, 3] · [3, 4]: 2·2·4·3 = 48 FLOPs
        carry, _ = jax.lax.scan(lambda x, _: (x, inner(x)), a, length=3)
        cheap = lambda: jnp.einsum("ij,ij->i", a, a)  # contracts 3, batch 2: 2·2·3 = 12
        no_preferred_type = jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())))  # the same dot, keyed alike
        return (jax.lax.cond(flag, lambda: inner(a).sum(), lambda: cheap().sum()) + carry.sum()
                + no_preferred_type.sum())

    a, b = jnp.ones((2, 3)), jnp.ones((3, 4))
    counts = dot_bound.count_dots(jax.make_jaxpr(f)(a, b, True).jaxpr)
    assert [(dot.lhs, dot.rhs, dot.flops, n) for dot, n in counts.items()] == [((2, 3), (3, 4), 48, 5)]  # 3 + cond + 1
    batched = dot_bound.Dot((5, 2, 3), (5, 3, 7), "float32", "float32", (((2,), (1,)), ((0,), (0,))), "float32")
    assert batched.flops == 2 * 5 * 2 * 7 * 3


def test_the_steps_matmuls_are_the_flop_formulas_plus_the_heads_recomputed_logits(setup):
    closed = jax.make_jaxpr(lambda s, t, v: setup.train_fn(s, t, v, detailed=False))(
        setup.state, setup.tokens, setup.valid)
    counts = dot_bound.count_dots(closed.jaxpr)
    dot_flops = sum(dot.flops * n for dot, n in counts.items())
    cfg, tokens = setup.model_cfg, setup.tokens_per_step
    # The head's backward pass recomputes its logits (model/head.py) rather than keep them.
    recomputed = 2 * cfg.d_model * cfg.vocab_size * tokens
    assert dot_flops == flops.train_flops_per_token(cfg, 32) * tokens + recomputed == 54_722_560
    with pytest.raises(ConfigError, match="one device's matmuls, and jax sees 4 devices"):
        dot_bound.run_dots(setup, steps=1, repeats=1)


def test_dots_mode_on_one_device_adds_up_its_matmuls(tmp_path):
    record_file = tmp_path / "dots.jsonl"
    result = subprocess.run([sys.executable, "-m", "tdlm_jax.bench", f"--config={TINY}", "--mode=dots", "--steps=1",
                             "--repeats=1", "--peak_tflops=1", f"--json={record_file}"],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO),
                                 "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(record_file.read_text())["figures"]
    rows = figures["dots"]
    assert figures["dots_alone_seconds"] == pytest.approx(sum(r["count"] * r["seconds"] for r in rows))
    assert figures["dot_flops_per_step"] == 54_722_560 and figures["peak_flops_per_second"] == 1e12
    assert figures["dots_alone_fraction_of_peak"] == pytest.approx(54_722_560 / figures["dots_alone_seconds"] / 1e12)
    assert "matmuls alone" in result.stdout and rows[0]["dot"] in result.stdout
