"""The analysis package's one error type (its own module so every part can import it)."""

from glam_jax.errors import GlamError


class AnalysisError(GlamError):
    """A model, text or option the routing analysis cannot use, in one sentence."""
