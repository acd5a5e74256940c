"""tdlm_jax: masked (absorbing-state) discrete diffusion language models in JAX."""
