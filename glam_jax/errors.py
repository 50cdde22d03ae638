"""The one base class of every user-facing glam_jax error.

Command-line tools catch `GlamError` and print its one-sentence message instead of a
traceback; each subsystem subclasses it (ConfigError, ShardingError, DataError, ...).
"""


class GlamError(ValueError):
    """A bad value supplied by the user, described in one sentence naming what is valid."""
