"""SavedModel: a tf.Module whose functions call the fused op (loss and a training
step, so also the gradient op) is saved here and loaded in fresh processes:
with `import fused_masked_mae` it runs and gives the same values; without it
TensorFlow refuses to load it, naming the op type `Import_fused_masked_mae>MaskedMae`.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import fused_masked_mae as fm

VOCAB, START, END, PAD = 9, 1, 7, 8


class TinyTagger(tf.Module):
    """A softmax regression trained with the masked MAE, as a plain tf.Module."""

    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(0)
        self.w = tf.Variable(rng.normal(size=(VOCAB, VOCAB)).astype(np.float32))

    def _loss(self, x, y):
        y_pred = tf.nn.softmax(tf.matmul(x, self.w))
        return tf.reduce_mean(fm.masked_mae(y, y_pred, START, END, tokens=[PAD]))

    @tf.function(input_signature=[tf.TensorSpec([None, VOCAB], tf.float32)] * 2)
    def loss(self, x, y):
        return self._loss(x, y)

    @tf.function(input_signature=[tf.TensorSpec([None, VOCAB], tf.float32)] * 2)
    def train_step(self, x, y):
        with tf.GradientTape() as tape:
            loss = self._loss(x, y)
        self.w.assign_sub(5.0 * tape.gradient(loss, self.w))
        return loss


def data():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, VOCAB, size=32)
    labels[::3] = END
    labels[1::4] = PAD
    y = np.eye(VOCAB, dtype=np.float32)[labels]
    x = (y + 0.3 * rng.random(y.shape)).astype(np.float32)
    return x, y


LOAD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    if sys.argv[2] == "import":
        import fused_masked_mae  # registers the ops
    x, y = (np.asarray(a, np.float32) for a in json.load(open(sys.argv[3])))
    try:
        module = tf.saved_model.load(sys.argv[1])
    except Exception as e:
        print("LOAD-ERROR " + json.dumps([type(e).__name__, str(e)]))
        sys.exit(3)
    losses = [float(module.loss(x, y))] + [float(module.train_step(x, y)) for _ in range(3)]
    print("VALUES " + json.dumps([losses, float(tf.reduce_sum(module.w))]))
    """
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved_model")
    x, y = data()
    module = TinyTagger()
    tf.saved_model.save(module, str(path / "tagger"))
    with open(path / "data.json", "w") as f:
        json.dump([x.tolist(), y.tolist()], f)
    # What the loaded copy must reproduce: the same calls on the original.
    losses = [float(module.loss(x, y))] + [float(module.train_step(x, y)) for _ in range(3)]
    return path, losses, float(tf.reduce_sum(module.w))


def run_loader(saved, mode):
    path = saved[0]
    return subprocess.Popen(
        [sys.executable, "-c", LOAD, str(path / "tagger"), mode, str(path / "data.json")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


def test_saved_graph_holds_the_fused_ops(saved):
    path = saved[0]
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((path / "tagger" / "saved_model.pb").read_bytes())
    ops = {node.op for f in proto.meta_graphs[0].graph_def.library.function for node in f.node_def}
    assert {"Import_fused_masked_mae>MaskedMae", "Import_fused_masked_mae>MaskedMaeGrad"} <= ops


def test_loads_and_runs_in_a_fresh_process_with_the_import_only(saved):
    _, losses, weight_sum = saved
    assert losses[-1] < losses[1], losses  # the training step trains
    with_import, without_import = run_loader(saved, "import"), run_loader(saved, "no-import")
    out, err = with_import.communicate(timeout=240)
    assert with_import.returncode == 0, err[-3000:]
    (line,) = [ln for ln in out.splitlines() if ln.startswith("VALUES ")]
    loaded_losses, loaded_weight_sum = json.loads(line[len("VALUES "):])
    np.testing.assert_allclose(loaded_losses, losses, rtol=1e-6)
    np.testing.assert_allclose(loaded_weight_sum, weight_sum, rtol=1e-6)

    out, err = without_import.communicate(timeout=240)
    assert without_import.returncode == 3, (out[-2000:], err[-2000:])
    (line,) = [ln for ln in out.splitlines() if ln.startswith("LOAD-ERROR ")]
    kind, message = json.loads(line[len("LOAD-ERROR "):])
    # TensorFlow's own message (nothing of ours runs before it): it names the
    # op type, whose namespace is the package's name in CamelCase, but not the
    # module to import. docs/integration.md says what to do.
    assert kind == "RuntimeError"
    assert "Op type not registered 'Import_fused_masked_mae>MaskedMae'" in message
    # The op namespace is the instruction: TensorFlow's message names the op
    # type, and the type begins with what to import.
    assert "Import_fused_masked_mae>" in message


def test_namespace_whitelist_is_optional_but_must_list_the_namespace_if_given(tmp_path):
    """The default (None) allows every namespace. A given whitelist must name
    Import_fused_masked_mae (TensorFlow checks the functions reachable from signatures)."""
    module = TinyTagger()
    signatures = {"serving_default": module.loss}
    with pytest.raises(ValueError, match=r"non-whitelisted namespaces.*Import_fused_masked_mae>MaskedMae"):
        tf.saved_model.save(module, str(tmp_path / "a"), signatures=signatures,
                            options=tf.saved_model.SaveOptions(namespace_whitelist=["Other"]))
    for whitelist in (None, ["Import_fused_masked_mae"]):
        target = tmp_path / f"b{whitelist is None}"
        tf.saved_model.save(module, str(target), signatures=signatures,
                            options=tf.saved_model.SaveOptions(namespace_whitelist=whitelist))
        assert (target / "saved_model.pb").exists()


# A jit-compiled function saves XLA custom calls instead of the op: see
# tests/test_xla.py::test_saved_model_of_a_jit_function_reloads_in_a_fresh_process.
