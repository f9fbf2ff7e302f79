"""One worker of tests/test_multi_worker.py (or, without TF_CONFIG, the
single-process run it is compared with). Prints one line `RESULT <json>`.

    python multi_worker_worker.py tf_keras_fit        tf_keras' fit with TfKerasMaskedMAE
    python multi_worker_worker.py keras3_loop [--jit]  a Keras 3 model trained by a custom
                                                       loop with MaskedMAE
    python multi_worker_worker.py die                  raise at once (the harness's own test)

With TF_CONFIG set, the strategy is MultiWorkerMirroredStrategy (one CPU
replica per worker); without it, the default strategy on one device. Every
worker sees the same global batches, and takes its own half of each, so the
objective (the mean over the global batch) is the one-process objective.
"""

import argparse
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

VOCAB, START, END, STEPS = 12, 1, 10, 6
GLOBAL_BATCH, NUM_BATCHES, EPOCHS = 32, 4, 3


def data():
    rng = np.random.default_rng(0)
    x = rng.integers(2, VOCAB - 1, size=(GLOBAL_BATCH * NUM_BATCHES, STEPS))
    x[:, 0] = START
    x[:, 4:] = END
    return x.astype(np.int32), np.eye(VOCAB, dtype=np.float32)[x]


def build(keras):
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((STEPS,), dtype="int32"),
        keras.layers.Embedding(VOCAB, 8),
        keras.layers.Dense(VOCAB, activation="softmax"),
    ])


def tf_keras_fit(strategy):
    import tf_keras

    import fused_masked_mae as fm

    x, y = data()
    with strategy.scope():
        model = build(tf_keras)
        model.compile(optimizer=tf_keras.optimizers.Adam(0.05),
                      loss=fm.TfKerasMaskedMAE(START, END, tokens=[11]))
    # fit splits each global batch of 32 over the replicas (16 per worker).
    history = model.fit(x, y, epochs=EPOCHS, batch_size=GLOBAL_BATCH, shuffle=False, verbose=0)
    return history.history["loss"], model.get_weights()


def keras3_loop(strategy, jit):
    """Keras 3's fit does not run under MultiWorkerMirroredStrategy (with any
    loss, Keras' own included), so Keras 3 users train with a custom loop:
    this one, with the per-replica loss and gradient jit-compiled or not."""
    import keras

    import fused_masked_mae as fm

    x, y = data()
    replicas = strategy.num_replicas_in_sync
    per_replica = GLOBAL_BATCH // replicas
    with strategy.scope():
        model = build(keras)
        optimizer = keras.optimizers.Adam(0.05)
        optimizer.build(model.trainable_variables)
    loss_fn = fm.MaskedMAE(START, END, tokens=[11], reduction=None)

    def dataset_fn(input_context):
        # Every worker reads the same global batches and keeps its own slice.
        begin = input_context.input_pipeline_id * per_replica
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
        return ds.map(lambda a, b: (a[begin:begin + per_replica], b[begin:begin + per_replica]))

    @tf.function(jit_compile=jit)
    def loss_and_grads(xb, yb):
        with tf.GradientTape() as tape:
            per_position = loss_fn(yb, model(xb, training=True))  # [batch, steps]
            per_example = tf.reduce_mean(per_position, axis=-1)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=GLOBAL_BATCH)
        return loss, tape.gradient(loss, model.trainable_variables)

    def replica_step(xb, yb):
        loss, grads = loss_and_grads(xb, yb)
        # Keras 3's optimizer sums the gradients over the replicas itself (an
        # all-reduce in replica context, outside XLA, where collectives do not
        # compile on CPU); summing them here as well would double them.
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def train_step(batch):
        losses = strategy.run(replica_step, args=batch)
        return strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

    dist = strategy.distribute_datasets_from_function(dataset_fn)
    epoch_losses = []
    for _ in range(EPOCHS):
        total = 0.0
        for batch in dist:
            total += float(train_step(batch))
        epoch_losses.append(total / NUM_BATCHES)
    return epoch_losses, [v.numpy() for v in model.trainable_variables]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["tf_keras_fit", "keras3_loop", "die"])
    parser.add_argument("--jit", action="store_true")
    args = parser.parse_args()
    if args.mode == "die":
        raise SystemExit("worker failed on purpose")
    if "TF_CONFIG" in os.environ:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    if args.mode == "tf_keras_fit":
        losses, weights = tf_keras_fit(strategy)
    else:
        losses, weights = keras3_loop(strategy, args.jit)
    task = json.loads(os.environ.get("TF_CONFIG", "{}")).get("task", {})
    print("RESULT " + json.dumps(dict(
        replicas=strategy.num_replicas_in_sync, task=task.get("index"),
        losses=[float(v) for v in losses],
        weights=[np.asarray(w, np.float64).ravel().tolist() for w in weights])))


if __name__ == "__main__":
    main()
