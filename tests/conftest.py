"""Test-wide setup: 4 fake CPU devices, so multi-device code runs in every test process.

XLA reads the flag when JAX initializes its backend, so it must be set before any test
module imports jax.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The token cache (tdlm_jax.data.cache) goes to a directory of this test session, never to the
# user's ~/.cache; subprocesses started by tests inherit it. Removed when the session ends.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

os.environ["TDLM_CACHE_DIR"] = tempfile.mkdtemp(prefix="tdlm_test_token_cache_")
atexit.register(shutil.rmtree, os.environ["TDLM_CACHE_DIR"], ignore_errors=True)
# Hugging Face `datasets` (the hf: source tests) never reaches the network, and keeps its own
# cache and lock files in the session's directory too. Read when `datasets` is imported.
os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = os.path.join(os.environ["TDLM_CACHE_DIR"], "huggingface")
# One persistent compilation cache for the session (not the user's), shared by both workers and
# every run they start, in process or not: a program several tests compile, such as the tiny
# config's steps, is compiled once. JAX reads the variable when it is imported; a run's default
# cache directory keeps to it (tdlm_jax.training.compilation.cache_dir). Tests of the workdir
# default unset it.
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(os.environ["TDLM_CACHE_DIR"], "compilation_cache")
