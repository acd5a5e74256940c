"""A trained run loaded back from its workdir, for sampling and evaluation.

`TrainedModel` is what inference takes; the trainer builds one from its live parameters to
log samples at evaluation time. `load_trained` builds the same model the run trained
(`tdlm_jax.training.setup`) and restores a checkpoint's parameters into it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
from flax import nnx

from tdlm_jax.data import dataset, tokenizer as tokenizer_lib
from tdlm_jax.errors import CheckpointError
from tdlm_jax.metrics.jsonl import CONFIG_FILE
from tdlm_jax.parallel import sharding
from tdlm_jax.training import checkpoint, setup


@dataclasses.dataclass
class TrainedModel:
    """A run's config, tokenizer and restored parameters (replicated over all devices)."""

    config: ml_collections.ConfigDict
    tokenizer: tokenizer_lib.Tokenizer
    graphdef: nnx.GraphDef
    params: Any
    step: int

    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params)


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run saved as config.json."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist: --workdir must be a directory written by tdlm_jax.main")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def load_trained(workdir: str, step: int | None = None) -> TrainedModel:
    """Restores the parameters of checkpoint `step` (default: the latest) of a workdir."""
    config = load_config(workdir)
    # The tokenizer the run recorded (bpe:<n> reloads the one it trained), checked against tokenizer_info.json.
    tok = dataset.load_tokenizer(workdir, config.data.tokenizer)
    graphdef, params, optimizer, _ = setup.build_model_and_optimizer(config, tok)
    replicated = sharding.replicated(sharding.make_mesh())
    abstract = setup.abstract_like(jax.eval_shape(lambda: setup.fresh_state(config, params, optimizer)),
                                   lambda _: replicated)
    with checkpoint.Checkpointer(os.path.join(workdir, setup.CHECKPOINTS)) as checkpointer:
        step = step if step is not None else checkpointer.latest_step()
        if step is None:
            raise CheckpointError(f"no checkpoint in {checkpointer.directory}: train first, or pass another --workdir")
        state = checkpointer.restore(step, abstract)
    # The EMA of the parameters when the run kept one: what its evaluations and samples used.
    return TrainedModel(config=config, tokenizer=tok, graphdef=graphdef, params=state.eval_params(), step=step)
