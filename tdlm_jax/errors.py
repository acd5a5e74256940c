"""User-facing errors.

Every error a user can cause (a bad config value, a missing data file, a corrupt
checkpoint) is raised as a subclass of `TdlmError` with a one-line message that names
the problem and the fix. `tdlm_jax.main` prints that line and exits, instead of showing
a traceback from deep inside JAX.
"""


class TdlmError(Exception):
    """Base class of errors whose message is meant for the user, not for a debugger."""


class ConfigError(TdlmError):
    """An invalid configuration value."""


class DataError(TdlmError):
    """A missing, empty or unusable data source."""


class CheckpointError(TdlmError):
    """A checkpoint that cannot be read or written."""


class TrainingError(TdlmError):
    """Training cannot usefully go on (e.g. every recent batch gave a non-finite loss)."""


class SweepError(TdlmError):
    """An unusable sweep file, sweep directory or point definition."""
