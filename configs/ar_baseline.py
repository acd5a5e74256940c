"""The autoregressive baseline: base.py's data, tokenizer, transformer, batch and token
budget, trained with a causal mask and next-token loss. Its val/loss is an exact NLL per
byte, directly comparable with the diffusion model's NELBO bound from configs/base.py.
"""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("base.py")))


def get_config():
    config = _base["get_config"]()
    config.model.kind = "ar"
    return config
