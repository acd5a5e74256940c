"""Small shared building blocks for tests: one tiny model and one set of jitted steps per
process, because compilation dominates the cost of small CPU tests."""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from tdlm_jax.diffusion.corruption import Corrupted, ForwardProcess
from tdlm_jax.diffusion.loss import scoring_targets
from tdlm_jax.diffusion.schedules import Schedule
from tdlm_jax.model.head import TokenScores, scores_from_logits
from tdlm_jax.model.transformer import Denoiser, ModelConfig
from tdlm_jax.parallel import sharding
from tdlm_jax.training import optim
from tdlm_jax.training import step as step_lib

BATCH, LENGTH = 8, 16
EDGES = (0.0, 0.3, 0.7, 1.0)
MODEL = ModelConfig(vocab_size=258, num_predictable=256, d_model=32, num_heads=2, num_layers=2, mlp_dim=64)


def make_process(sampling: str = "stratified", t_min: float = 1e-3, batch_size: int = BATCH) -> ForwardProcess:
    return ForwardProcess(Schedule("linear"), t_min, sampling, "elbo", 10.0, 256, EDGES, batch_size)


def scored(logits_BxLxV, batch: Corrupted) -> TokenScores:
    """The scores the loss and metrics read, of whole (e.g. hand-built) logits of `batch`."""
    return scores_from_logits(logits_BxLxV, scoring_targets(batch))


@functools.lru_cache(maxsize=None)
def model_parts():
    """(graphdef, params) of a freshly initialized tiny denoiser."""
    return nnx.split(Denoiser(MODEL, nnx.Rngs(0)))


@functools.lru_cache(maxsize=None)
def optimizer_and_schedule():
    schedule = optim.learning_rate_schedule(1e-3, 100, 0, "constant", 1.0)
    return optim.make_optimizer(schedule, weight_decay=0.0, b1=0.9, b2=0.99, grad_clip_norm=0.0), schedule


@functools.lru_cache(maxsize=None)
def train_fn(num_devices: int, sampling: str = "stratified", t_min: float = 1e-3, mesh_shape=(-1, 1)):
    """The jitted train step on a (data, fsdp) = `mesh_shape` mesh of the first `num_devices` devices."""
    mesh = sharding.make_mesh(jax.devices()[:num_devices], mesh_shape)
    optimizer, schedule = optimizer_and_schedule()
    graphdef, params = model_parts()  # outside eval_shape: the cached params must be concrete
    abstract = jax.eval_shape(lambda: step_lib.init_state(params, optimizer, seed=0))
    fn = step_lib.jit_train_step(mesh, sharding.state_shardings(mesh, abstract), graphdef=graphdef,
                                 process=make_process(sampling, t_min), optimizer=optimizer, lr_schedule=schedule)
    return mesh, fn


def fresh_state(mesh):
    """A new state; copied, because the train step donates (and so deletes) its input."""
    optimizer, _ = optimizer_and_schedule()
    params = jax.tree.map(lambda x: x.copy(), model_parts()[1])
    return sharding.place_state(step_lib.init_state(params, optimizer, seed=0), mesh)  # FSDP on an fsdp mesh


def random_batch(seed: int = 0, with_padding: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, (BATCH, LENGTH)).astype(np.int32)
    valid = np.ones((BATCH, LENGTH), bool)
    if with_padding:
        valid[-1, LENGTH // 2:] = False  # one row ends in padding, like a final window
        tokens[~valid] = 257
    return {"tokens": tokens, "valid": valid}
