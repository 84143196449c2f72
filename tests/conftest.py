"""Test configuration: numerics flags set before any JAX computation."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
