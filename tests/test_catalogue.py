"""The catalogue of metric names (tdlm_jax.metrics.catalogue) against what a run logs and
what the README's metric tables list."""

import pathlib
import re
import runpy

import pytest

from tdlm_jax.metrics import catalogue, health_rules, jsonl
from tdlm_jax.training import loop

REPO = pathlib.Path(__file__).resolve().parents[1]
RULES = tuple(rule.name for rule in health_rules.default_rules())


def tiny_config():
    return runpy.run_path(str(REPO / "configs" / "tiny.py"))["get_config"]()


def test_a_run_with_every_tier_logs_exactly_the_catalogue_names(tmp_path):
    config = tiny_config()  # 8 steps: tier 1 every 2, tier 2 every 4, tier 3 at 8, validation every 4
    summary = loop.train(config, str(tmp_path))
    rows = jsonl.read(tmp_path / "metrics.jsonl")
    logged = set().union(*rows) - {"step"}
    expected = catalogue.scalar_names("diffusion", num_layers=config.model.num_layers, rules=RULES)
    assert logged == expected, (sorted(logged - expected), sorted(expected - logged))
    assert set(summary) == {n for n in expected if catalogue.tier_of(n) == catalogue.SUMMARY}
    # Each row holds the names of one tier (the summary row, the ones of the summary).
    for row in rows:
        assert len({catalogue.tier_of(n) for n in row if n != "step"}) == 1, row


def test_names_that_can_be_missing_are_exactly_the_catalogued_ones():
    assert catalogue.MISSING_WHEN_EMPTY == {
        "train/tokens_per_second", "metrics/mask_accuracy", "metrics/valid_ratio", "val/mask_accuracy",
        "research/low_corruption_accuracy", "research/medium_corruption_accuracy",
        "research/high_corruption_accuracy", "research/gradient_norm_ratio_high_to_low",
        "research/weight_difficulty_correlation", "research/avg_loss_weight", "research/weight_std",
        "research/avg_prediction_difficulty", "research/low_corruption_loss_std",
        "research/medium_corruption_loss_std", "research/high_corruption_loss_std",
        "research/loss_estimator_stderr", "research/gradient_noise_scale"}


@pytest.mark.parametrize("name, tier", [
    ("train/loss", catalogue.TIER1), ("val/loss", catalogue.TIER1), ("research/high_corruption_count", catalogue.TIER2),
    ("advanced/attention_entropy/layer_11", catalogue.TIER3), ("alerts/total", catalogue.SUMMARY),
    ("alerts/starts/overfitting", catalogue.SUMMARY), ("research/huge_corruption_count", None),
    ("advanced/attention_entropy/layer_x", None), ("train/los", None)])
def test_every_concrete_name_finds_its_entry(name, tier):
    assert catalogue.tier_of(name) == tier


def readme_names() -> set[str]:
    """The backticked metric names in the README's tables, `{a,b,c}` expanded."""
    names = set()
    for line in (REPO / "README.md").read_text().splitlines():
        if not line.startswith("| `"):
            continue
        first_cell = line.split("|")[1]
        for token in re.findall(r"`([^`]+)`", first_cell):
            choices = re.search(r"\{([a-z]+(?:,[a-z]+)+)\}", token)
            if choices:
                names |= {token.replace(choices.group(0), c) for c in choices.group(1).split(",")}
            else:
                names.add(token)
    return {n for n in names if re.match(r"(train|metrics|val|research|advanced|summary|alerts|samples)/", n)
            or n == "hparams"}


def test_the_readme_tables_list_every_catalogued_name_and_no_other():
    catalogued = {n for m in catalogue.CATALOGUE for n in (m.expand() if "{bucket}" in m.name else [m.name])}
    assert readme_names() == catalogued
