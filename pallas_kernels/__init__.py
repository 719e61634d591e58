"""Pallas kernels for compressed attention (each beside its pure-jnp reference)."""
