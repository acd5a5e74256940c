"""The speed–quality comparison of samplers: `python -m tdlm_jax.evaluate --samplers=...`.

Every (sampler, steps) pair draws the same number of samples with the same seed, times them
(compiled first, not timed), and scores them with the autoregressive run: generative
perplexity in float64 and the samples' unigram entropy, beside the data's own entropy over as
many tokens. A record is on the frontier when no other record of adequate diversity is both
faster and lower in perplexity; records whose entropy falls well below the data's
(`evaluation.LOW_DIVERSITY_RATIO`) are marked collapsed and kept off the frontier, since
repeating frequent tokens lowers perplexity without being better text. first_hitting ignores
`steps` (one call per mask), so it is drawn once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from tdlm_jax.diffusion.sampling import resolve_sampler
from tdlm_jax.errors import ConfigError
from tdlm_jax.inference import evaluation
from tdlm_jax.inference.trained import TrainedModel
from tdlm_jax.metrics.formatting import format_number as fmt  # the project's one number formatter

STEPLESS = ("first_hitting",)  # samplers whose calls do not depend on `steps`


def parse_list(text: str, flag: str, kind: type = str) -> list[Any]:
    """A comma-separated flag value as a list; a one-line ConfigError naming the flag if bad."""
    try:
        items = [kind(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ConfigError(f"--{flag}={text!r}: must be a comma-separated list of {kind.__name__}s") from None
    if not items:
        raise ConfigError(f"--{flag} is empty: give a comma-separated list")
    return items


def pairs(samplers: Sequence[str], steps: Sequence[int]) -> list[tuple[str, int]]:
    """(sampler, steps) to draw, checked: stepless samplers once, at the largest step count."""
    for name in samplers:
        resolve_sampler(name)
    if any(k < 1 for k in steps):
        raise ConfigError(f"--sampler_steps={','.join(map(str, steps))}: every step count must be at least 1")
    return [(name, k) for name in samplers for k in ([max(steps)] if name in STEPLESS else steps)]


def compare(trained: TrainedModel, scorer: TrainedModel, *, samplers: Sequence[str], steps: Sequence[int],
            num_samples: int, seed: int, sampling_dtype: str) -> list[dict[str, Any]]:
    """One record per (sampler, steps): its cost, its scores and a few of its samples."""
    data_entropy = evaluation.data_unigram_entropy(trained, num_samples)
    records = []
    for name, k in pairs(samplers, steps):
        scores = evaluation.generative_scores(trained, scorer, num_samples=num_samples, steps=k, sampler=name,
                                              seed=seed, sampling_dtype=sampling_dtype)
        records.append({"sampler": name, "steps": None if name in STEPLESS else k, "nfe": scores["gen/nfe"],
                        "seconds_per_sample": scores["gen/seconds_per_sample"],
                        "gen/perplexity": scores["gen/perplexity"],
                        "gen/unigram_entropy": scores["gen/unigram_entropy"],
                        "data_unigram_entropy": data_entropy,
                        "collapsed": evaluation.diversity_warning(scores["gen/unigram_entropy"], data_entropy)
                        is not None,
                        "samples": scores["gen/samples"]})
    for record in records:
        record["frontier"] = on_frontier(record, records)
    return records


def on_frontier(record: dict[str, Any], records: Sequence[dict[str, Any]]) -> bool:
    """Not collapsed, and no other uncollapsed record is at least as fast and as good, and
    strictly better in one of the two."""
    if record["collapsed"]:
        return False
    time, ppl = record["seconds_per_sample"], record["gen/perplexity"]
    return not any(not other["collapsed"] and other is not record
                   and other["seconds_per_sample"] <= time and other["gen/perplexity"] <= ppl
                   and (other["seconds_per_sample"] < time or other["gen/perplexity"] < ppl)
                   for other in records)


def results_path(workdir: str, step: int, extension: str) -> str:
    return os.path.join(workdir, f"samplers_{step}.{extension}")


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """The comparison as text, one line per record."""
    lines = [f"  {'sampler':<15}{'steps':>6}{'nfe':>6}{'s/sample':>10}{'gen/ppl':>10}{'entropy':>9}  note"]
    for r in records:
        note = "frontier" if r["frontier"] else ("collapsed: low diversity" if r["collapsed"] else "")
        steps = "—" if r["steps"] is None else str(r["steps"])
        lines.append(f"  {r['sampler']:<15}{steps:>6}{r['nfe']:>6}{fmt(r['seconds_per_sample']):>10}"
                     f"{fmt(r['gen/perplexity']):>10}{fmt(r['gen/unigram_entropy']):>9}  {note}")
    return "\n".join(lines)
