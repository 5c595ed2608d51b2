"""Training: the paper's MountainCar claim (the true dynamics are a rank-3
tensor, so a rank-3 PerSim learns them and its agent factors encode gravity),
ensemble behaviour, best-validation selection, checkpoint resume, rank
selection, and argument validation."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIT_KEY
from persim_jax import data
from persim_jax.persim import train
from persim_jax.persim.simulator import Simulator


def _validation_part(transitions, key=FIT_KEY, fraction=0.2):
    _, validation_index = train.validation_split(key, transitions.num_transitions, fraction)
    return transitions.select(validation_index)


predict_batch = jax.jit(jax.vmap(Simulator.predict, in_axes=(None, 0, 0, 0)))   # (B, M, D)


def test_one_step_validation_rmse_is_far_below_the_spread_of_delta(mountaincar_data,
                                                                    mountaincar_fit):
    transitions, _ = mountaincar_data
    simulator, _ = mountaincar_fit
    held_out = _validation_part(transitions)
    pred = np.asarray(predict_batch(simulator, held_out.agent_id, held_out.obs, held_out.action))
    truth = np.asarray(held_out.next_obs)
    delta_std = np.asarray(held_out.delta).std(axis=0)
    rmse_mean = np.sqrt(np.mean((pred.mean(axis=1) - truth) ** 2, axis=0))
    rmse_members = np.sqrt(np.mean((pred - truth[:, None]) ** 2, axis=0))      # (M, D)
    # Per state dimension (position, velocity): within a tenth of the spread
    # of the one-step change, for the ensemble mean and for every member.
    assert np.all(rmse_mean < 0.1 * delta_std), (rmse_mean, delta_std)
    assert np.all(rmse_members < 0.1 * delta_std), (rmse_members, delta_std)


def test_agent_factors_determine_gravity_on_held_out_agents(mountaincar_data, mountaincar_fit):
    _, covariates = mountaincar_data
    simulator, _ = mountaincar_fit
    gravity = covariates[:, 0]
    fit_agents, test_agents = np.arange(0, 100, 2), np.arange(1, 100, 2)
    factors = np.asarray(simulator.agent_factors(member=None))                  # (M, N, r)
    assert factors.shape == (3, 100, 3)
    for member_factors in factors:
        design = np.c_[member_factors, np.ones(100)]
        coef, *_ = np.linalg.lstsq(design[fit_agents], gravity[fit_agents], rcond=None)
        residual = gravity[test_agents] - design[test_agents] @ coef
        r2 = 1 - residual.var() / gravity[test_agents].var()
        assert r2 > 0.9, r2


def test_ensemble_members_differ_but_agree(mountaincar_data, mountaincar_fit):
    transitions, _ = mountaincar_data
    simulator, _ = mountaincar_fit
    factors = np.asarray(simulator.agent_factors(member=None))
    assert not np.allclose(factors[0], factors[1]) and not np.allclose(factors[1], factors[2])
    held_out = _validation_part(transitions)
    pred = np.asarray(predict_batch(simulator, held_out.agent_id[:500], held_out.obs[:500],
                                    held_out.action[:500]))
    spread = pred.std(axis=1).mean(axis=0)                                        # (D,)
    assert np.all(spread > 0)
    assert np.all(spread < 0.2 * np.asarray(held_out.delta).std(axis=0))


def test_losses_decrease_and_best_validation_parameters_are_kept(mountaincar_data,
                                                                 mountaincar_fit):
    transitions, _ = mountaincar_data
    simulator, history = mountaincar_fit
    assert [m.epoch for m in history] == list(range(1, 26))
    train_loss = np.stack([m.train_loss for m in history])                      # (E, M)
    validation_loss = np.stack([m.validation_loss for m in history])
    best = np.stack([m.best_validation_loss for m in history])
    assert train_loss.shape == (25, 3)
    assert np.all(train_loss[-1] < 0.1 * train_loss[0])
    assert np.all(validation_loss[-1] < 0.1 * validation_loss[0])
    assert np.all(np.diff(best, axis=0) <= 0)
    np.testing.assert_array_equal(best[-1], validation_loss.min(axis=0))
    np.testing.assert_array_equal(simulator.validation_loss, validation_loss.min(axis=0))

    # Recomputed from the returned parameters: their loss IS the best one.
    train_index, validation_index = train.validation_split(FIT_KEY, transitions.num_transitions,
                                                           0.2)
    batch = train.make_batch(transitions, simulator.stats, validation_index)
    recomputed = jax.vmap(train.loss_fn, in_axes=(0, None, None))(
        simulator.params, simulator.config, batch)
    np.testing.assert_allclose(recomputed, simulator.validation_loss, rtol=1e-4)
    # The statistics come from the training split only.
    np.testing.assert_allclose(simulator.stats.obs_mean,
                               np.asarray(transitions.obs)[train_index].mean(axis=0), rtol=1e-5)


def test_validation_split_is_random_across_trajectories(mountaincar_data):
    transitions, _ = mountaincar_data
    train_index, validation_index = train.validation_split(FIT_KEY, transitions.num_transitions,
                                                           0.2)
    assert len(validation_index) == 4000 and len(np.intersect1d(train_index, validation_index)) == 0
    assert len(train_index) + len(validation_index) == transitions.num_transitions
    per_agent = np.bincount(np.asarray(transitions.agent_id)[validation_index], minlength=100)
    assert per_agent.min() > 10 and per_agent.max() < 70    # every trajectory is cut


def test_save_load_gives_identical_predictions(tmp_path, mountaincar_data, mountaincar_fit):
    transitions, _ = mountaincar_data
    simulator, _ = mountaincar_fit
    path = tmp_path / "simulator.msgpack"
    simulator.save(path)
    loaded = Simulator.load(path)
    rows = slice(0, 300)
    args = (transitions.agent_id[rows], transitions.obs[rows], transitions.action[rows])
    np.testing.assert_array_equal(predict_batch(simulator, *args), predict_batch(loaded, *args))
    np.testing.assert_array_equal(loaded.agent_factors(None), simulator.agent_factors(None))
    assert loaded.config == simulator.config


def test_rollout_of_a_trained_simulator_equals_chained_predictions(mountaincar_fit):
    simulator, _ = mountaincar_fit
    actions = jnp.array([2, 2, 0, 1, 0, 2, 2, 1])
    obs0 = jnp.array([-0.5, 0.01])
    rollout = jax.jit(Simulator.rollout)(simulator, 7, obs0, actions)             # (M, H, D)
    step = jax.jit(Simulator.predict_members)
    state = jnp.broadcast_to(obs0, (3, 2))
    for t in range(len(actions)):
        state = step(simulator, 7, state, actions[t])
        np.testing.assert_allclose(rollout[:, t], state, rtol=1e-6, atol=1e-7)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("halving", [None, 3])
def test_resume_after_interrupt_gives_identical_parameters(tmp_path, small_mountaincar_data,
                                                           halving):
    transitions, _ = small_mountaincar_data
    options = dict(rank=3, key=jax.random.PRNGKey(4), ensemble_size=2, epochs=6, batch_size=64,
                   state_hidden=(32,), progress=False, lr_halving_epochs=halving)
    uninterrupted = train.fit(transitions, **options)

    def interrupt_after_epoch_5(metrics):
        if metrics.epoch == 5:
            raise Interrupt

    directory = tmp_path / "checkpoints"
    with pytest.raises(Interrupt):
        train.fit(transitions, checkpoint_dir=directory, checkpoint_every=2,
                  callback=interrupt_after_epoch_5, **options)
    assert sorted(os.listdir(directory / "rank_3")) == ["2", "4"]

    resumed_epochs = []
    resumed = train.fit(transitions, checkpoint_dir=directory, checkpoint_every=2,
                        callback=lambda m: resumed_epochs.append(m.epoch), **options)
    assert resumed_epochs == [5, 6]                                # restarted from epoch 4
    for a, b in zip(jax.tree.leaves(uninterrupted), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)

    # A finished run is resumed at its end: nothing left to train, same result.
    again = []
    finished = train.fit(transitions, checkpoint_dir=directory, checkpoint_every=2,
                         callback=again.append, **options)
    assert again == []
    for a, b in zip(jax.tree.leaves(uninterrupted), jax.tree.leaves(finished)):
        np.testing.assert_array_equal(a, b)

    with pytest.raises(ValueError, match="checkpoint_dir.*different run.*learning_rate"):
        train.fit(transitions, checkpoint_dir=directory, **{**options, "learning_rate": 0.01})


@pytest.mark.parametrize("damaged", ["state", "run"])
def test_a_damaged_checkpoint_is_warned_about_and_training_starts_again(
        tmp_path, small_mountaincar_data, caplog, damaged):
    transitions, _ = small_mountaincar_data
    options = dict(rank=3, key=jax.random.PRNGKey(4), ensemble_size=2, epochs=2, batch_size=64,
                   state_hidden=(16,), progress=False)
    directory = tmp_path / "checkpoints"
    straight = train.fit(transitions, **options)
    train.fit(transitions, checkpoint_dir=directory, checkpoint_every=1, **options)
    # Garble every file of the latest step's state (or its run description),
    # as a crash or a full disk half-way through a write would.
    for root, _, files in os.walk(directory / "rank_3" / "2" / damaged):
        for name in files:
            with open(os.path.join(root, name), "wb") as handle:
                handle.write(b"\x00garbage")
    epochs = []
    with caplog.at_level("WARNING"):
        again = train.fit(transitions, checkpoint_dir=directory, checkpoint_every=1,
                          callback=lambda m: epochs.append(m.epoch), **options)
    warnings = [r.getMessage() for r in caplog.records if "damaged checkpoint" in r.getMessage()]
    assert len(warnings) == 1 and str(directory / "rank_3") in warnings[0]
    assert "\n" not in warnings[0]
    assert epochs == [1, 2]                                        # from scratch
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)
    # The fresh run's checkpoints replace the damaged ones and resume cleanly.
    assert sorted(os.listdir(directory / "rank_3")) == ["1", "2"]
    resumed = []
    train.fit(transitions, checkpoint_dir=directory, checkpoint_every=1,
              callback=resumed.append, **options)
    assert resumed == []


def test_rank_auto_selects_by_validation_loss(mountaincar_data):
    transitions, _ = mountaincar_data
    seen = []
    simulator = train.fit(transitions, rank="auto", rank_candidates=(1, 3),
                          key=jax.random.PRNGKey(2), ensemble_size=2, epochs=4,
                          learning_rate=3e-3, state_hidden=(32,),
                          callback=lambda m: seen.append(m.rank), progress=False)
    ranks = [r for r, _ in simulator.rank_losses]
    losses = dict(simulator.rank_losses)
    assert ranks == [1, 3] and sorted(set(seen)) == [1, 3]
    # Rank 1 cannot express MountainCar's additive action and gravity terms.
    assert simulator.rank == 3 and losses[3] < 0.5 * losses[1]
    np.testing.assert_allclose(losses[3], np.mean(simulator.validation_loss), rtol=1e-6)


def _continuous_system(num_agents=12, steps=60, seed=0):
    """s' = s + g_n · B a: a linear system with a per-agent gain g_n."""
    rng = np.random.default_rng(seed)
    gain = rng.uniform(0.5, 2.0, num_agents)
    b = np.array([[1.0, 0.0], [0.5, -1.0], [0.0, 2.0]])
    obs = rng.normal(size=(num_agents, steps, 3))
    action = rng.uniform(-1, 1, (num_agents, steps, 2))
    next_obs = obs + gain[:, None, None] * action @ b.T * 0.1
    return data.from_rollouts(obs, action, next_obs, covariates=gain[:, None])


def test_continuous_actions_train_and_report_progress(capsys):
    transitions = _continuous_system()
    history = []
    simulator = train.fit(transitions, rank=2, key=jax.random.PRNGKey(0), ensemble_size=2,
                          epochs=15, batch_size=64, learning_rate=3e-3, state_hidden=(16,),
                          action_hidden=(16,), callback=history.append, progress=True)
    assert simulator.config.action_dim == 2 and simulator.stats.action_mean.shape == (2,)
    assert np.all(history[-1].validation_loss < 0.2 * history[0].validation_loss)
    assert simulator.predict(0, jnp.zeros(3), jnp.ones(2)).shape == (2, 3)
    assert "fit rank 2" in capsys.readouterr().err              # the tqdm bar


def test_without_validation_the_last_parameters_are_returned(small_mountaincar_data):
    transitions, _ = small_mountaincar_data
    history = []
    simulator = train.fit(transitions, rank=2, key=jax.random.PRNGKey(0), ensemble_size=2,
                          epochs=2, validation_fraction=0.0, state_hidden=(8,),
                          callback=history.append, progress=False)
    assert np.all(np.isnan(simulator.validation_loss))
    assert np.all(np.isnan(history[-1].validation_loss))
    with pytest.raises(ValueError, match="validation_fraction"):
        train.fit(transitions, rank="auto", key=jax.random.PRNGKey(0), validation_fraction=0.0)


def test_raw_targets_without_standardisation(small_mountaincar_data):
    transitions, _ = small_mountaincar_data
    simulator = train.fit(transitions, rank=3, key=jax.random.PRNGKey(0), ensemble_size=2,
                          epochs=2, standardize=False, state_hidden=(8,), progress=False)
    np.testing.assert_array_equal(simulator.stats.obs_mean, np.zeros(2))
    np.testing.assert_array_equal(simulator.stats.delta_std, np.ones(2))
    # The model then predicts raw Δ: next = obs + network output.
    member = jax.tree.map(lambda x: x[1], simulator.params)
    obs = transitions.obs[0]
    raw = train.model_lib.apply(member, simulator.config, 3, obs, transitions.action[0])
    np.testing.assert_allclose(simulator.predict(3, obs, transitions.action[0])[1], obs + raw,
                               rtol=1e-6)


def test_step_size_halves_every_lr_halving_epochs():
    # Adam's bias-corrected step under a constant gradient is exactly -lr, so
    # the updates show the schedule: 2 epochs of 3 steps at 0.1, then 0.05, ...
    optimizer = train.make_optimizer(0.1, 2, steps_per_epoch=3)
    params = jnp.zeros(())
    state = optimizer.init(params)
    steps = []
    for _ in range(14):
        updates, state = optimizer.update(jnp.ones(()), state, params)
        steps.append(float(-updates))
    np.testing.assert_allclose(steps, [0.1] * 6 + [0.05] * 6 + [0.025] * 2, rtol=1e-4)
    constant = train.make_optimizer(0.1, None, steps_per_epoch=3)
    state = constant.init(params)
    for _ in range(8):
        updates, state = constant.update(jnp.ones(()), state, params)
    np.testing.assert_allclose(float(-updates), 0.1, rtol=1e-4)


@pytest.mark.parametrize("options,field", [
    (dict(rank="big"), "rank"),
    (dict(rank=0), "rank"),
    (dict(rank=3, ensemble_size=0), "ensemble_size"),
    (dict(rank=3, epochs=2.5), "epochs"),
    (dict(rank=3, batch_size=-1), "batch_size"),
    (dict(rank=3, learning_rate=0.0), "learning_rate"),
    (dict(rank=3, validation_fraction=1.0), "validation_fraction"),
    (dict(rank="auto", rank_candidates=()), "rank_candidates"),
    (dict(rank=3, checkpoint_every=0), "checkpoint_every"),
    (dict(rank=3, lr_halving_epochs=0), "lr_halving_epochs"),
])
def test_fit_rejects_bad_arguments(small_mountaincar_data, options, field):
    transitions, _ = small_mountaincar_data
    with pytest.raises(ValueError, match=field):
        train.fit(transitions, key=jax.random.PRNGKey(0), progress=False, **options)


def test_fit_validates_the_data(small_mountaincar_data):
    transitions, _ = small_mountaincar_data
    broken = transitions.replace(obs=np.asarray(transitions.obs).copy())
    broken.obs[17, 1] = np.nan
    with pytest.raises(ValueError, match="obs: row 17"):
        train.fit(broken, rank=3, key=jax.random.PRNGKey(0), progress=False)
