"""tf.distribute: `fit` under MirroredStrategy over two logical CPU devices gives
the losses of a one-device run.

Logical devices must be configured before TensorFlow initializes its devices,
so the comparison runs in a fresh Python process.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

SCRIPT = textwrap.dedent(
    """
    import json

    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    import keras
    import numpy as np

    import fused_masked_mae as fm

    VOCAB, START, END = 12, 1, 10
    rng = np.random.default_rng(0)
    x = rng.integers(2, VOCAB - 1, size=(64, 6))
    x[:, 0] = START
    x[:, 4:] = END
    y = np.eye(VOCAB, dtype=np.float32)[x]
    sample_weight = rng.random((64, 6)).astype(np.float32)  # per position


    def build():
        return keras.Sequential([
            keras.Input((6,), dtype="int32"),
            keras.layers.Embedding(VOCAB, 8),
            keras.layers.Dense(VOCAB, activation="softmax"),
        ])


    keras.utils.set_random_seed(0)
    initial = build().get_weights()


    def run(strategy, weighted):
        with strategy.scope():
            model = build()
            model.set_weights(initial)
            model.compile(optimizer=keras.optimizers.Adam(0.05),
                          loss=fm.MaskedMAE(START, END, tokens=[11]))
        history = model.fit(x, y, sample_weight=sample_weight if weighted else None,
                            epochs=3, batch_size=32, shuffle=False, verbose=0)
        evaluated = model.evaluate(x, y, batch_size=32, verbose=0)
        return dict(replicas=strategy.num_replicas_in_sync, loss=history.history["loss"],
                    evaluate=float(evaluated),
                    weights=[float(np.abs(w).sum()) for w in model.get_weights()])


    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    result = {"devices": devices}
    for weighted in (False, True):
        result[f"single_{weighted}"] = run(tf.distribute.OneDeviceStrategy(devices[0]), weighted)
        result[f"mirrored_{weighted}"] = run(tf.distribute.MirroredStrategy(devices), weighted)

    # Under XLA: each replica runs a jit-compiled loss and gradient (the custom
    # calls) on its half of the batch. (Keras' whole-step jit_compile cannot
    # run MirroredStrategy over logical CPUs: XLA refuses variables placed on
    # another device, with or without this loss.)
    @tf.function(jit_compile=True)
    def replica_loss_and_grad(y_batch, p_batch):
        with tf.GradientTape() as tape:
            tape.watch(p_batch)
            total = tf.reduce_sum(fm.masked_mae(y_batch, p_batch, START, END, tokens=[11]))
        return total, tape.gradient(total, p_batch)

    strategy = tf.distribute.MirroredStrategy(devices)
    p = tf.nn.softmax(tf.constant(rng.normal(size=y.shape), tf.float32))
    batch = next(iter(strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((y, p)).batch(64))))
    totals, grads = strategy.run(replica_loss_and_grad, args=batch)
    with tf.GradientTape() as tape:
        tape.watch(p)
        single_total = tf.reduce_sum(fm.masked_mae(y, p, START, END, tokens=[11]))
    single_grad = tape.gradient(single_total, p)
    result["xla"] = dict(
        replicas=len(strategy.experimental_local_results(grads)),
        total=float(strategy.reduce(tf.distribute.ReduceOp.SUM, totals, axis=None)),
        single_total=float(single_total),
        grads_equal=bool(np.array_equal(
            np.concatenate([g.numpy() for g in strategy.experimental_local_results(grads)]),
            single_grad.numpy())))
    print("RESULT " + json.dumps(result))
    """
)


def test_mirrored_strategy_matches_one_device():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    result = json.loads(line[len("RESULT "):])
    assert len(result["devices"]) == 2, result["devices"]
    for weighted in (False, True):
        single, mirrored = result[f"single_{weighted}"], result[f"mirrored_{weighted}"]
        assert single["replicas"] == 1 and mirrored["replicas"] == 2
        assert mirrored["loss"][-1] < 0.9 * mirrored["loss"][0], mirrored["loss"]
        # Each replica reduces its half batch with sum_over_batch_size and Keras
        # divides by the number of replicas: the global batch mean, as on one device.
        np.testing.assert_allclose(mirrored["loss"], single["loss"], rtol=1e-6)
        np.testing.assert_allclose(mirrored["evaluate"], single["evaluate"], rtol=1e-6)
        np.testing.assert_allclose(mirrored["weights"], single["weights"], rtol=1e-5)
    xla = result["xla"]
    assert xla["replicas"] == 2 and xla["grads_equal"], xla
    np.testing.assert_allclose(xla["total"], xla["single_total"], rtol=1e-6)
