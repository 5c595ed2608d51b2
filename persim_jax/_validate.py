"""Kept for the modules that still import it; use `persim_jax.validation`."""

from persim_jax.validation import positive_int  # noqa: F401
