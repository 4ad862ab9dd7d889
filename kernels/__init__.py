"""Pallas kernels with plain-jnp references."""
