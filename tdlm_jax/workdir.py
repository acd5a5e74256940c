"""Loading a trained run back from its workdir, for sampling and evaluation."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
from flax import nnx

from tdlm_jax import checkpoint, sharding
from tdlm_jax import step as step_lib
from tdlm_jax.data import dataset, tokenizer as tokenizer_lib
from tdlm_jax.errors import CheckpointError


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
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist: --workdir must be a directory written by tdlm_jax.main")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def load_trained(workdir: str, step: int | None = None) -> TrainedModel:
    """Restores the parameters of checkpoint `step` (default: the latest) of a workdir."""
    from tdlm_jax import config as config_lib  # config -> generation -> this module: import late
    from tdlm_jax.train import build_model_and_optimizer  # train imports much; only loaders need it

    config = load_config(workdir)
    # The tokenizer the run recorded (bpe:<n> reloads the one it trained), checked against tokenizer_info.json.
    tok = dataset.load_tokenizer(workdir, config.data.tokenizer)
    graphdef, params, optimizer, _ = build_model_and_optimizer(config, tok)
    replicated = sharding.replicated(sharding.make_mesh())
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                            jax.eval_shape(lambda: step_lib.init_state(
                                params, optimizer, config.seed, ema=config_lib.ema_decay(config) > 0)))
    with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")) as checkpointer:
        step = step if step is not None else checkpointer.latest_step()
        if step is None:
            raise CheckpointError(f"no checkpoint in {checkpointer.directory}: train first, or pass another --workdir")
        state = checkpointer.restore(step, abstract)
    # The EMA of the parameters when the run kept one: what its evaluations and samples used.
    return TrainedModel(config=config, tokenizer=tok, graphdef=graphdef, params=state.eval_params(), step=step)
