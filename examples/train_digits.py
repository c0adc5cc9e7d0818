"""Train a Keras classifier on scikit-learn's digits with rayhooks, on 2 Ray workers.

    python examples/train_digits.py [--out DIR_OR_URL] [--steps N] [--workers N] [--backend ray|local]

Each worker trains under `tf.distribute.MultiWorkerMirroredStrategy` (rayhooks
sets TF_CONFIG on every Ray worker). The chief actor owns the schedule:
checkpoints to OUT/ckpt every 50 steps, written asynchronously by worker 0;
summaries to OUT/logs every 10 steps; a listener on the chief evaluates every
committed checkpoint on held-out data. Nothing is downloaded: the data ships
with scikit-learn. Open the summaries with `tensorboard --logdir OUT`.

On a Ray cluster: `ray job submit -- python examples/train_digits.py --out gs://bucket/run`.
"""

import argparse
import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import rayhooks as rh


def load_data(seed=0):
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    return train_test_split(x, y.astype(np.int64), test_size=0.25, random_state=seed)


def make_model():
    import tensorflow as tf
    return tf.keras.Sequential([tf.keras.Input((64,)), tf.keras.layers.Dense(64, activation="relu"),
                                tf.keras.layers.Dense(10)])


class EvaluateEachCheckpoint(rh.CheckpointSaverListener):
    """Runs on the chief: restores each committed checkpoint into its own model and scores it."""

    def begin(self):
        import tensorflow as tf
        _, self.x, _, self.y = load_data()
        self.model = make_model()
        self.checkpoint = tf.train.Checkpoint(model=self.model)
        self.history = []

    def after_save(self, session, global_step_value):
        import numpy as np
        session.restore(global_step_value, into=self.checkpoint)
        predictions = np.argmax(self.model(self.x, training=False).numpy(), axis=1)
        accuracy = float(np.mean(predictions == self.y))
        self.history.append((global_step_value, accuracy))
        print("  checkpoint %-5d committed; held-out accuracy %.3f" % (global_step_value, accuracy), flush=True)


def train_fn(ctx):
    """Runs on every worker."""
    import tensorflow as tf
    strategy = (tf.distribute.MultiWorkerMirroredStrategy() if "TF_CONFIG" in os.environ
                else tf.distribute.get_strategy())
    x_train, _, y_train, _ = load_data()
    per_worker = 32
    data = (tf.data.Dataset.from_tensor_slices((x_train, y_train)).repeat()
            .shuffle(2048, seed=ctx.worker_index).batch(per_worker * ctx.num_workers))
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    batches = iter(strategy.experimental_distribute_dataset(data.with_options(options)))
    with strategy.scope():
        model = make_model()
        optimizer = tf.keras.optimizers.Adam(1e-2)
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=tf.keras.losses.Reduction.NONE)

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = tf.nn.compute_average_loss(loss_fn(y, logits), global_batch_size=per_worker * ctx.num_workers)
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, 1), y), tf.float32))
        return loss, correct

    @tf.function
    def train_step(batch):
        loss, correct = strategy.run(replica_step, args=batch)
        loss = strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)
        correct = strategy.reduce(tf.distribute.ReduceOp.SUM, correct, axis=None)
        return {"loss": loss, "accuracy": correct / (per_worker * ctx.num_workers)}

    with ctx.session(state=tf.train.Checkpoint(model=model, optimizer=optimizer)) as sess:
        while not sess.should_stop():
            sess.run(train_step, next(batches))
    return sess.global_step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/digits", help="directory or fsspec URL for checkpoints and logs")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--backend", choices=["ray", "local"], default="ray")
    parser.add_argument("--gpus-per-worker", type=float, default=0,
                        help="GPUs each Ray worker reserves (on a GPU cluster: 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    out = args.out.rstrip("/")
    if "://" not in out:
        out = os.path.abspath(out)  # Ray workers do not share the driver's working directory
    ckpt_dir, log_dir = out + "/ckpt", out + "/logs"
    print("training on load_digits for %d steps with %d %s workers" % (args.steps, args.workers, args.backend))
    result = rh.launch(
        train_fn, num_workers=args.workers, backend=args.backend,
        resources_per_worker={"CPU": 1, "GPU": args.gpus_per_worker} if args.gpus_per_worker else None,
        chief_only_hooks=[
            rh.AsyncCheckpointSaverHook(ckpt_dir, save_steps=50, listeners=[EvaluateEachCheckpoint()]),
            rh.SummarySaverHook(save_steps=10, output_dir=log_dir, summary_op=["loss", "accuracy"]),
        ],
        hooks=[rh.StopAtStepHook(last_step=args.steps)],
        tf_config=args.backend == "ray" and args.workers > 1,
        ray_init_kwargs={"include_dashboard": False})
    print("finished at step %d; final training loss %.3f" % (result.last_step, result.metrics.get("loss", float("nan"))))
    print("checkpoints: %s (latest: %s)" % (ckpt_dir, result.latest_checkpoint))
    print("summaries:   %s   (tensorboard --logdir %s)" % (log_dir, out))
    return result


if __name__ == "__main__":
    main()
