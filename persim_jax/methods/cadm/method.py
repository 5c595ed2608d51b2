"""Vanilla and PE-TS CaDM as methods of the harness: how it builds, trains
and plans them, with their config (`CaDMConfig`, the paper's `VANILLA` /
`PE_TS`, from `model`)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from persim_jax import planning
from persim_jax.methods.base import ModelBased, Trains
from persim_jax.methods.cadm.dynamics import CaDMDynamicsForAgent
from persim_jax.methods.cadm.model import PE_TS, VANILLA, CaDMConfig, CaDMModel
from persim_jax.methods.cadm.train import fit

# CaDM's planners draw 200 sequences (random shooting and CEM).
CANDIDATES = 200


@dataclasses.dataclass(frozen=True)
class VanillaCaDM(ModelBased, Trains):
    """Vanilla CaDM: one deterministic context-conditioned model."""

    config: CaDMConfig = VANILLA
    name: ClassVar[str] = "vanilla_cadm"
    settings: ClassVar[dict] = {
        "cadm_iterations": ("iterations", "CaDM fits of <= 5 epochs each (paper: 100)."),
        "cadm_pairs_per_epoch": ("pairs_per_epoch",
                                 "(context, transition) pairs per CaDM epoch (default: all)."),
    }

    @classmethod
    def from_settings(cls, settings, *, env, training):
        del env, training
        return cls(dataclasses.replace(cls.config, **settings))

    def training_description(self) -> dict:
        # Particles are a planning setting: `fit` never reads them, and
        # `dynamics_for_agent` plans with this method's, not the stored model's.
        return {k: v for k, v in self.description().items() if k != "particles"}

    def train(self, transitions, key, *, workdir=None, agent_ids=None) -> CaDMModel:
        del agent_ids                       # one model; agents differ by their history
        return fit(transitions, self.config, key=key, checkpoint_dir=workdir)

    def save(self, trained: CaDMModel, path) -> None:
        trained.save(path)

    def load(self, path) -> CaDMModel:
        return CaDMModel.load(path)

    def dynamics_for_agent(self, trained: CaDMModel, agent_ids, *, for_planning=True):
        if trained.config.particles != self.config.particles:   # trained for another run
            trained = trained.replace(config=dataclasses.replace(
                trained.config, particles=self.config.particles))
        return CaDMDynamicsForAgent(trained, for_planning)

    def planner_config(self, config):
        """CaDM's own objective on the run's planner: the particles' mean of
        undiscounted returns, no warm start; at most CaDM's 200 candidates;
        CEM starts every plan from σ = 0.5 (variance 0.25). A run that plans
        with iCEM plans CaDM with it too (its carried-over elites kept)."""
        fields = dict(aggregation="mean", discount=1.0)
        if isinstance(config, planning.RandomShootingConfig):
            fields.update(num_candidates=min(config.num_candidates, CANDIDATES), warm_start=False)
        else:
            fields.update(num_samples=min(config.num_samples, CANDIDATES),
                          num_elites=min(config.num_elites, min(config.num_samples, CANDIDATES)))
            if isinstance(config, planning.ICEMConfig):
                fields.update(init_std=0.5)
            else:
                fields.update(init_std_low=0.5, init_std_high=0.5)
        return dataclasses.replace(config, **fields)


@dataclasses.dataclass(frozen=True)
class PETSCaDM(VanillaCaDM):
    """PE-TS CaDM: 5 bootstrapped probabilistic members, 20 TS-∞ particles."""

    config: CaDMConfig = PE_TS
    name: ClassVar[str] = "pe_ts_cadm"
    settings: ClassVar[dict] = {
        **VanillaCaDM.settings,
        "cadm_particles": ("particles", "PE-TS CaDM particles when planning (paper: 20)."),
    }
