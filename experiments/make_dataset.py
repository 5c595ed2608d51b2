"""Generates (or reuses) one of the paper's offline datasets and prints its
Table 8 statistics beside the paper's.

    python -m experiments.make_dataset --env=cartpole --dataset=pure
    python -m experiments.make_dataset --env=mountaincar --dataset=all --data_dir=data
    python -m experiments.make_dataset --env=halfcheetah --dataset=random --force

Writes `<data_dir>/<env>_<dataset>_seed<seed>.npz` (the `persim_jax.data`
format, covariates included) and its `.json` metadata sidecar; a dataset
already there for the same env, dataset, seed, number of agents and pure
policies is reused unless `--force`.

`--minari` also writes it as the local Minari dataset `persim/<env>/<dataset>-v0`
(under MINARI_DATASETS_PATH; `_seed<s>` / `_n<N>` added to the name for
another seed or number of agents): one episode per agent with its id and
covariates, the generator, seed, agents and Table 8 statistics in its
description (`experiments.minari_data`). Read it back with
`persim_jax.from_minari` or `experiments.run --dataset=minari:<id>`.

    python -m experiments.make_dataset --env=cartpole --dataset=pure --minari
"""

from __future__ import annotations

from absl import app, flags

import envs
from experiments import cli, minari_data
from experiments.datagen import datasets

FLAGS = flags.FLAGS
flags.DEFINE_enum("env", None, list(envs.ENV_NAMES), "Environment.")
flags.DEFINE_enum("dataset", None, list(datasets.DATASETS) + ["all"],
                  "Dataset (behaviour policy), or 'all' for the four.")
flags.DEFINE_string("data_dir", datasets.DEFAULT_DATA_DIR, "Where datasets are cached.")
flags.DEFINE_integer("seed", 0, "Seed of the agents, resets and exploration.")
flags.DEFINE_integer("num_agents", datasets.NUM_AGENTS, "Number of agents (the paper: 500).")
flags.DEFINE_bool("force", False, "Regenerate even if a matching cached dataset exists.")
flags.DEFINE_string("policy_dir", None, "Pure policies (default: the shipped ones).")
flags.DEFINE_bool("minari", False, "Also write it as the local Minari dataset "
                  "persim/<env>/<dataset>-v0 (needs the minari extra).")


def make_datasets() -> int:
    names = datasets.DATASETS if FLAGS.dataset == "all" else (FLAGS.dataset,)
    if FLAGS.minari:
        minari_data.check_available()        # before any generation
    for name in names:
        transitions, metadata = datasets.load_or_generate(
            FLAGS.env, name, data_dir=FLAGS.data_dir, seed=FLAGS.seed,
            num_agents=FLAGS.num_agents, force=FLAGS.force, policy_dir=FLAGS.policy_dir)
        how = ("reused from the cache" if metadata["cached"] else
               f"generated in {metadata['generation_seconds']:.1f} s "
               f"({metadata['backend']}, compile included)")
        print(datasets.format_stats(metadata))
        print(f"  {metadata['path']}: {how}")
        if FLAGS.minari:
            minari_id, written = minari_data.write_paper_dataset(
                transitions, metadata, default_agents=datasets.NUM_AGENTS, force=FLAGS.force)
            print(f"  Minari dataset {minari_id}: "
                  f"{'written' if written else 'already there, the same request'}")
    return 0


def main(argv):
    del argv
    return cli.exit_on_user_error(make_datasets)


if __name__ == "__main__":
    flags.mark_flags_as_required(["env", "dataset"])
    app.run(main)
