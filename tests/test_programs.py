"""Memory known before step 1 (tdlm_jax.training.programs): every program a run calls is
compiled at start-up, its memory read from XLA, and a run that cannot fit stops there."""

import pathlib
import runpy

import jax
import pytest

from tdlm_jax import bench
from tdlm_jax.errors import TrainingError
from tdlm_jax.training import benchmark, loop, programs

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(**training):
    config = runpy.run_path(str(REPO / "configs" / "tiny.py"))["get_config"]()
    config.training.update({"num_steps": 8, "detailed_metrics_steps": 4, "attention_analysis_steps": 8, **training})
    config.sampling.num_samples_at_eval = 0
    return config


@pytest.mark.parametrize("start, training, expected", [
    (0, {}, ["train", "detailed", "eval", "analysis"]),
    (0, {"attention_analysis_steps": 100}, ["train", "detailed", "eval"]),  # tier 3 never fires in 8 steps
    (6, {"detailed_metrics_steps": 8}, ["train", "detailed", "eval", "analysis"]),  # resumed at 6: step 8 does
    (7, {"detailed_metrics_steps": 8}, ["detailed", "eval", "analysis"]),  # only step 8 is left: detailed
    (4, {"detailed_metrics_steps": 1, "attention_analysis_steps": 1}, ["detailed", "eval", "analysis"]),
])
def test_only_the_variants_the_remaining_steps_call_are_compiled(start, training, expected):
    assert programs.variants_used(tiny_config(**training), start, is_diffusion=True) == expected
    assert programs.variants_used(tiny_config(**training), start, is_diffusion=False) == ["train", "eval"]


def test_the_memory_of_every_program_adds_up_and_the_table_shows_it(capsys):
    setup = benchmark.build_setup(tiny_config())
    r = benchmark.run_memory(setup)
    by_name = {p.name: p for p in r["programs"]}
    assert list(by_name) == ["train", "detailed", "eval", "analysis"]
    state_bytes = programs.per_device_bytes(setup.state)
    params_bytes = programs.per_device_bytes(setup.state.params)
    train = by_name["train"].memory
    assert train.arguments >= state_bytes and train.aliased >= state_bytes  # the donated state is reused
    assert train.resident == 0 and train.temporaries > 0
    assert train.total == train.arguments + train.outputs + train.temporaries - train.aliased
    # Evaluation and the analysis take the parameters; the optimizer state stays resident beside them.
    assert by_name["eval"].memory.resident == by_name["analysis"].memory.resident == state_bytes - params_bytes > 0
    bench.print_memory(r)
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].startswith("memory per device (host RAM")
    assert "the tier-3 analysis" in printed and "evaluation" in printed


def test_a_run_that_cannot_fit_stops_before_step_1_in_one_line(tmp_path, monkeypatch):
    config = tiny_config()
    sizes = {}
    real_check = programs.check_fits

    def tight_capacity(compiled, capacity, source):
        sizes.update({p.name: p.memory.total for p in compiled})
        # Room for everything but the detailed variant, which first runs at step 4.
        return real_check(compiled, sizes["detailed"] - 1, "a test device")

    monkeypatch.setattr(programs, "check_fits", tight_capacity)
    with pytest.raises(TrainingError) as error:
        loop.train(config, str(tmp_path / "run"))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("out of memory before step 1: the train step with tier-2 metrics needs ")
    assert "a test device" in message and "training.grad_accum_steps" in message
    assert sizes["train"] < sizes["detailed"]  # the ordinary step alone would have fitted
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_check_fits_names_each_variant_s_fix():
    memory = programs.MemoryUse(arguments=10, outputs=10, temporaries=100, aliased=10, resident=5)
    for name, fix in [("eval", "data.eval_batch_size"), ("analysis", "training.analysis_rows")]:
        program = programs.Program(name, compiled=None, memory=memory)
        programs.check_fits([program], 115, "x")  # exactly fits: 5 + 10 + 10 + 100 − 10
        with pytest.raises(TrainingError, match=f"needs 116 B per device and the device has 115 B.*{fix}"):
            programs.check_fits([programs.Program(name, None, programs.MemoryUse(10, 10, 101, 10, 5))], 115, "x")
    assert programs.device_capacity(jax.devices()[0])[1].startswith("host RAM")
