"""Config presets inside the library: base defaults, model families, and the variant parser.

The top-level `configs/*.py` files are thin user-facing wrappers around these, so the library
(e.g. glam_jax.hf_checkpoint) never imports `configs`.
"""
