"""The paper's data-generation machinery, apart from the method (`persim_jax`).

  * `policies`: the logging and test policies' networks, acting (greedy,
    ε-mixed, `test_policy(env)` for the prediction protocol), evaluation and
    checkpoints (shipped in `experiments/policies/`);
  * `replay`: the replay buffer shared by the two trainers;
  * `dqn`, `td3`: the vmapped trainers of the logging policies (DQN for
    discrete actions, TD3 for continuous ones);
  * `datasets`: the generator of the paper's 12 offline datasets (3 envs × 4
    behaviour policies) and their Table 8 statistics.
"""
