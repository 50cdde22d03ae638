"""glam_jax: sparse Mixture-of-Experts language models (GLaM, GShard, Switch, Mixtral) in JAX."""
