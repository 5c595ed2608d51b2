"""What a user writes for `experiments.run --decide`: a reward, a termination
and candidate policies, as plain per-transition JAX functions, for the paper's
CartPole and MountainCar (their rules written out from gym's, independent of
`envs`; `tests/test_decisions.py` checks that they equal the envs').

    python -m experiments.run --dataset=cartpole.csv --decide \\
        --reward=experiments/examples/cartpole.py:reward \\
        --terminated=experiments/examples/cartpole.py:terminated \\
        --policies=experiments/examples/cartpole.py:balance,experiments/examples/cartpole.py:push_left
"""
