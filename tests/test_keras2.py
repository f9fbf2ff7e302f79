"""Keras 2: the loss in `tf_keras` models (TF_USE_LEGACY_KERAS=1, the seed's world).

TF_USE_LEGACY_KERAS must be set before TensorFlow is imported, so the checks run
in a fresh Python process. There, the seed's own loss, written with the
Keras 2 backend functions exactly as in the Q&A, is the oracle.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

LEGACY = textwrap.dedent(
    """
    import json, os, sys

    import numpy as np
    import tensorflow as tf
    import tf_keras
    from tf_keras import backend as K

    import fused_masked_mae as fm
    from fused_masked_mae import losses

    assert os.environ["TF_USE_LEGACY_KERAS"] == "1"
    assert tf.keras.Model is tf_keras.Model  # tf.keras is Keras 2 here
    lazy_before = losses._tf_keras_masked_mae_class.cache_info().currsize
    from fused_masked_mae.losses import TfKerasMaskedMAE, masked_mae_loss_fn

    VOCAB, START, END = 12, 1, 10
    out = {"lazy_before": lazy_before}


    class Seed:
        # The Q&A's solution 3, verbatim (K is Keras 2's backend).
        def __init__(self, startTokenAsIndex, endTokenAsIndex):
            self.startTokenAsIndex = startTokenAsIndex
            self.endTokenAsIndex = endTokenAsIndex

        def mean_absolute_error(self, y_true, y_pred):

            #for comparing, let's take exact values
            y_true_max = K.argmax(y_true)
            y_pred_max = K.argmax(y_pred)

            #compare with a proper tensor function
            equal_mask = K.equal(y_true_max,y_pred_max)
            is_start = K.equal(y_true_max, self.startTokenAsIndex)
            is_end = K.equal(y_true_max, self.endTokenAsIndex)

            #cast to float for multiplying and summing
            equal_mask = K.cast(equal_mask, K.floatx())
            is_start = K.cast(is_start, K.floatx())
            is_end = K.cast(is_end, K.floatx())
                #these are tensors with 0 (false) and 1 (true) as float

            #entire condition as you wanted
            condition = (is_start + is_end) * equal_mask
                # sum = or ||| multiply = and
                # we don't have to worry about the sum resulting in 2
                    # because you will never have startToken == endToken

            #reverse condition:
            condition = 1 - condition

            #result
            return condition * K.mean(K.abs(y_pred - y_true), axis=-1)


    seed_loss = Seed(START, END).mean_absolute_error

    # 1. The oracle: seed == reference == fused op, on data with ties broken.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, VOCAB, size=(8, 7))
    labels[:, 0] = START
    labels[:, 4:] = END
    y_true = tf.constant(np.eye(VOCAB)[labels], tf.float32)
    noise = rng.random((8, 7, VOCAB))
    right = rng.random((8, 7)) < 0.6
    y_pred = tf.constant(noise + 1.0 * (np.eye(VOCAB)[labels] * right[..., None]), tf.float32)
    seed = seed_loss(y_true, y_pred).numpy()
    reference = fm.reference_masked_mae(y_true, y_pred, START, END).numpy()
    fused = fm.masked_mae(y_true, y_pred, START, END).numpy()
    out["oracle"] = [seed.tolist(), reference.tolist(), fused.tolist()]

    # 2. tf_keras models trained with the seed's loss, the tf_keras class and the plain function.
    x = rng.integers(2, VOCAB - 1, size=(64, 6))
    x[:, 0] = START
    x[:, 4:] = END
    y = np.eye(VOCAB, dtype=np.float32)[x]


    def build():
        return tf_keras.Sequential([
            tf_keras.layers.Embedding(VOCAB, 8, input_length=6),
            tf_keras.layers.Dense(VOCAB, activation="softmax"),
        ])


    tf_keras.utils.set_random_seed(0)
    initial = build().get_weights()


    def train(loss, jit_compile=False):
        model = build()
        model.set_weights(initial)
        model.compile(optimizer=tf_keras.optimizers.Adam(0.05), loss=loss,
                      jit_compile=jit_compile)
        history = model.fit(x, y, epochs=3, batch_size=32, shuffle=False, verbose=0)
        evaluated = model.evaluate(x, y, batch_size=64, verbose=0)
        expected = float(tf.reduce_mean(seed_loss(tf.constant(y), model.predict(x, verbose=0))))
        return model, dict(loss=history.history["loss"], evaluate=float(evaluated),
                           expected=expected)


    model, out["class"] = train(TfKerasMaskedMAE(START, END))
    _, out["function"] = train(masked_mae_loss_fn(START, END))
    _, out["seed"] = train(seed_loss)
    # Under jit_compile the loss must be the XLA custom call, not the composite.
    custom_calls = []
    real_custom_call = fm.xla.masked_mae_custom_call
    fm.xla.masked_mae_custom_call = lambda *a, **k: custom_calls.append(1) or real_custom_call(*a, **k)
    _, out["class_jit"] = train(TfKerasMaskedMAE(START, END), jit_compile=True)
    fm.xla.masked_mae_custom_call = real_custom_call
    out["custom_call_traces"] = len(custom_calls)
    out["is_tf_keras_loss"] = isinstance(model.loss, tf_keras.losses.Loss)

    # 3. sample_weight and reductions are tf_keras'.
    sw = tf.constant(rng.random((8, 7)), tf.float32)
    per_position = fm.masked_mae(y_true, y_pred, START, END, tokens=[3])
    out["weighted"] = [
        float(TfKerasMaskedMAE(START, END, tokens=[3])(y_true, y_pred, sw)),
        float(tf.reduce_sum(per_position * sw) / tf.cast(tf.size(sw), tf.float32)),
        float(TfKerasMaskedMAE(START, END, reduction="sum", tokens=[3])(y_true, y_pred, sw)),
        float(tf.reduce_sum(per_position * sw)),
    ]

    # 4. Config and .keras round trip (registered: no custom_objects needed).
    config = TfKerasMaskedMAE(START, None, tokens=[3, 4], name="m").get_config()
    out["config"] = [config, TfKerasMaskedMAE.from_config(config).get_config()]
    path = os.path.join(sys.argv[1], "model.keras")
    model.save(path)
    loaded = tf_keras.models.load_model(path)
    out["loaded"] = [type(loaded.loss).__name__, loaded.loss.get_config() == model.loss.get_config(),
                     float(loaded.evaluate(x, y, batch_size=64, verbose=0))]
    print("RESULT " + json.dumps(out))
    """
)


def run(code, tmp_path, **env):
    return subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **env))


def result_of(proc):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    (line,) = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    return json.loads(line[len("RESULT "):])


def test_tf_keras_models(tmp_path):
    legacy = run(LEGACY, tmp_path, TF_USE_LEGACY_KERAS="1")
    # Meanwhile: without the legacy switch, importing the package leaves tf_keras alone.
    plain = run("import sys, fused_masked_mae; "
                "print('RESULT', int('tf_keras' in sys.modules))", tmp_path)
    assert result_of(plain) == 0

    out = result_of(legacy)
    # tf_keras was imported before fused_masked_mae: the class was made (and
    # registered for loading) at the package's import.
    assert out["lazy_before"] == 1
    seed, reference, fused = (np.array(a) for a in out["oracle"])
    assert (seed == 0).any() and (seed != 0).any()
    np.testing.assert_array_equal(reference, seed)  # same ops, same order
    np.testing.assert_allclose(fused, seed, rtol=2e-6)
    np.testing.assert_array_equal(fused == 0, seed == 0)

    assert out["is_tf_keras_loss"]
    assert out["custom_call_traces"] > 0  # the jit-compiled steps used the XLA custom calls
    for name in ("class", "function", "seed", "class_jit"):
        run_ = out[name]
        assert run_["loss"][-1] < 0.8 * run_["loss"][0], (name, run_)
        np.testing.assert_allclose(run_["evaluate"], run_["expected"], rtol=1e-5, err_msg=name)
        # The fused loss trains exactly like the seed's (float rounding apart).
        np.testing.assert_allclose(run_["loss"], out["seed"]["loss"], rtol=1e-5, err_msg=name)

    mean, expected_mean, total, expected_total = out["weighted"]
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-6)
    np.testing.assert_allclose(total, expected_total, rtol=1e-6)

    config, round_trip = out["config"]
    assert config["start_token"] == 1 and config["end_token"] is None
    assert config["tokens"] == [3, 4] and round_trip == config
    name, same_config, loaded_eval = out["loaded"]
    assert name == "TfKerasMaskedMAE" and same_config
    np.testing.assert_allclose(loaded_eval, out["class"]["evaluate"], rtol=1e-6)
