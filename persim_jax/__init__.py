"""persim-jax: personalised simulators for offline RL with heterogeneous agents (PerSim, in JAX)."""

__version__ = "0.1.0"
