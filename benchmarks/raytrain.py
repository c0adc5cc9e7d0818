"""Ray and Ray Train for the anchors: one place that starts them, shared by every figure."""

import os

import numpy as np

RAY_CPUS = 2  # the 2-core machine the suite is written for; an existing cluster keeps its own


def ensure_ray(*modules):
    """Ray for the run: the one already running, or a local one (`RAY_CPUS`); returns (ray, started_here).

    `modules` are pickled by value: Ray workers may not have benchmarks/ on their path.
    """
    import sys

    import ray
    import ray.cloudpickle
    for module in modules + (sys.modules[__name__],):
        ray.cloudpickle.register_pickle_by_value(module)
    if ray.is_initialized():
        return ray, False
    ray.init(num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False)
    return ray, True


def raytrain_fit(train_fn, config, storage_path, name):
    """Runs `train_fn(config)` on a Ray Train v2 function trainer with 1 worker; returns the Result."""
    import ray.train
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
    trainer = DataParallelTrainer(
        train_fn, train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.01}),
        run_config=ray.train.RunConfig(name=name, storage_path=storage_path,
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)))
    return trainer.fit()


def raytrain_error(e):
    """One line for a table cell: why a Ray Train anchor did not run."""
    text = str(e).strip()
    return "%s: %s" % (type(e).__name__, text.splitlines()[0][:200] if text else "")


def raytrain_poll_secs():
    """How often Ray Train's controller polls its workers (and so drains each one's report queue of size 1)."""
    from ray.train.v2._internal import constants
    return float(os.environ.get(constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR,
                                constants.DEFAULT_HEALTH_CHECK_INTERVAL_S))


def save_npy_dir(arrays, directory):
    """What a Ray Train user writes before report(): one .npy file per array, in a fresh directory."""
    os.makedirs(directory, exist_ok=True)
    for key, value in arrays.items():
        np.save(os.path.join(directory, key.replace("/", "_") + ".npy"), value)
