"""Train a small Keras classifier on scikit-learn's digits with rayhooks.

    python examples/train_digits.py [--out DIR_OR_URL] [--steps N]

Checkpoints go to OUT/ckpt (asynchronously, every 50 steps), summaries to
OUT/logs (every 10 steps); a listener evaluates every committed checkpoint
on held-out data. Nothing is downloaded: the data ships with scikit-learn.
Open the summaries with `tensorboard --logdir OUT`.
"""

import argparse
import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import rayhooks as rh


def make_data(batch_size=64, seed=0):
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=seed)
    train = tf.data.Dataset.from_tensor_slices((x_train, y_train)).shuffle(2048, seed=seed).repeat()
    return iter(train.batch(batch_size)), (x_test, y_test)


def make_model():
    return tf.keras.Sequential([tf.keras.Input((64,)), tf.keras.layers.Dense(64, activation="relu"),
                                tf.keras.layers.Dense(10)])


class EvaluateEachCheckpoint(rh.CheckpointSaverListener):
    """Restores each committed checkpoint into a separate model and scores it on held-out data."""

    def __init__(self, test_data):
        self.x, self.y = test_data
        self.model = make_model()
        self.history = []

    def after_save(self, session, global_step_value):
        session.restore(global_step_value, into=tf.train.Checkpoint(model=self.model))
        predictions = np.argmax(self.model(self.x, training=False).numpy(), axis=1)
        accuracy = float(np.mean(predictions == self.y))
        self.history.append((global_step_value, accuracy))
        print("  checkpoint %-6d held-out accuracy %.3f" % (global_step_value, accuracy))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/digits", help="directory or fsspec URL for checkpoints and logs")
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    batches, test_data = make_data()
    model = make_model()
    optimizer = tf.keras.optimizers.Adam(1e-2)
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def train_step(batch):
        x, y = batch
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = loss_fn(y, logits)
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        accuracy = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, 1, output_type=tf.int32),
                                                   tf.cast(y, tf.int32)), tf.float32))
        return {"loss": loss, "accuracy": accuracy, "logits": logits}

    ckpt_dir, log_dir = args.out.rstrip("/") + "/ckpt", args.out.rstrip("/") + "/logs"
    evaluator = EvaluateEachCheckpoint(test_data)
    hooks = [
        rh.AsyncCheckpointSaverHook(ckpt_dir, save_steps=50, listeners=[evaluator]),
        rh.SummarySaverHook(save_steps=10, output_dir=log_dir, summary_op=["loss", "accuracy", "logits"]),
        rh.StepCounterHook(every_n_steps=100, output_dir=log_dir),
        rh.StopAtStepHook(last_step=args.steps),
    ]
    state = tf.train.Checkpoint(model=model, optimizer=optimizer)
    print("training on load_digits for %d steps" % args.steps)
    with rh.MonitoredTrainingSession(checkpoint_dir=ckpt_dir, chief_only_hooks=hooks, save_checkpoint_secs=None,
                                     save_summaries_steps=None, log_step_count_steps=None,
                                     state=state) as sess:
        while not sess.should_stop():
            sess.run(train_step, next(batches))
    latest = rh.CheckpointStore(rh.Storage(ckpt_dir)).latest()
    print("finished at step %d" % sess.global_step)
    print("checkpoints: %s (latest: %s)" % (ckpt_dir, latest.url if latest else None))
    print("summaries:   %s   (tensorboard --logdir %s)" % (log_dir, args.out))
    return evaluator.history


if __name__ == "__main__":
    main()
