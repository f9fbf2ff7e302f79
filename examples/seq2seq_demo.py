"""Seq2seq with one-hot outputs: the Q&A's three fixes for the end-token collapse, side by side.

The story (a Q&A about Keras seq2seq models): an LSTM encoder-decoder in the
style of the Keras blog's "ten-minute introduction to sequence-to-sequence
learning" (teacher forcing, one softmax over the vocabulary per output step,
one-hot targets) is trained with mean absolute error. Its targets are padded
with the end token up to a fixed length, like

    [2 (start), 3, 123, 1548 (end), 1548, 1548, 1548, 1548, 1548, 1548]

so most target positions are end tokens, and the model ends up predicting the
end token everywhere. The answer proposes three fixes:

  fix 1, masking: reserve id 0 for "nothing after the end", pad with it, and
     use `mask_zero=True` in the Embedding, so padded positions carry no loss;
  fix 2, class weighting: weight the end token by
     ratio = mean(count of each other class) / count(end token);
  fix 3, a masked MAE: a position costs nothing when the target's argmax
     equals the prediction's argmax and that is the start or the end token;
     every other position costs mean |p - t| over the classes. That is
     `fused_masked_mae.MaskedMAE`, one fused op:

         model.compile(optimizer="adam", loss=MaskedMAE(start_token=START, end_token=END))

What this script does:
  1. makes a synthetic task: reverse a random sequence of 2..6 tokens; the
     target is [START, reversed tokens..., END] padded to 12 positions, with
     END (as in the Q&A) or, for fix 1, with PAD = 0. As in the blog, the
     decoder reads the target sequence and predicts it one step ahead, so
     START is a decoder input, never a decoder target;
  2. builds the encoder-decoder once (a twin with `mask_zero=True` in the
     decoder Embedding for fix 1, same weights), saves the initial weights and
     trains every configuration from them, with the same seed, batches,
     optimizer, learning rate and epochs:
       mae        plain MAE, END padding: the Q&A's setting
       fix1       MAE, PAD padding, mask_zero=True, sample_weight 0 on padding
       fix2       MAE, END padding, per-timestep sample_weight = ratio on END
                  targets, 1 elsewhere. (Keras 3.15's class_weight fails on
                  NumPy sequence targets with a TypeError; on a tf.data input
                  it makes these same per-timestep weights. Explicit weights
                  work with either input.)
       fix3       MaskedMAE(START, END), END padding (the fused op)
       fix1+3     MaskedMAE with fix 1's padding, mask and weights
       fix2+3     MaskedMAE with fix 2's weights
       cce        categorical cross-entropy, END padding (what a practitioner
                  would reach for)
       cce+fix1   categorical cross-entropy with fix 1's padding and mask;
       cce+3      the seed's mask on cross-entropy: MaskedCrossentropy(START, END)
                  (fused), END padding: a position costs nothing when target
                  and prediction agree on START or END
       cce+fix1+3 MaskedCrossentropy with fix 1's padding, mask and weights;
  3. after every epoch decodes the held-out sources greedily (encoder states,
     then one decoder step at a time feeding back the argmax, as in the blog)
     and reads each prediction up to its first END (everything after it counts
     as END, as a user stopping at END would see it). It measures the share of
     predicted positions that are END ("END share": 1.0 is the collapse; a
     perfect model matches the targets' share), the token accuracy where the
     target is not END ("non-END acc"), and the share of sequences decoded
     exactly ("exact"); with the training loss and the wall time of the epoch
     (decoding excluded) it prints one progress line per epoch;
  4. prints one table (markdown) and a conclusion written from the numbers of
     this run, and writes demo_results.png (loss curves, held-out accuracy
     curves, a bar chart of the final metrics) and demo_results.json (every
     number) into --out.

It reports whatever happens; nothing is tuned per configuration. The models
are compiled with jit_compile=False, so MaskedMAE runs the fused op on every
device (under XLA it would build the composite of plain ops instead).

Run (the package installed, or PYTHONPATH pointing at it):
    python examples/seq2seq_demo.py              # default: vocab 300, 10000 sequences, 10 epochs
    python examples/seq2seq_demo.py --quick      # small run (vocab 100), for tests and a first look
    python examples/seq2seq_demo.py --configs mae,fix3,cce --epochs 5 --out /tmp/demo
    python examples/seq2seq_demo.py --seeds 0,1,2  # every configuration per seed, then a table
                                                   # of mean, standard deviation and range
    ./build.sh demo [args]                       # default mode against the built wheel, writes
                                                 # build/demo/demo_results.{png,json}
"""

import argparse
import json
import math
import os
import platform
import sys
import time

PROCESS_START = time.perf_counter()  # the wall time reported includes the imports below
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

import numpy as np  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import fused_masked_mae  # noqa: E402
from fused_masked_mae import MaskedCrossentropy, MaskedMAE  # noqa: E402

# Token ids. 0 pads the encoder input (masked there) and, for fix 1, the target
# sequence after END. With --vocab 1549 START and END are the Q&A's 2 and 1548.
PAD = 0
START = 2
FIRST_WORD = 3  # word tokens are FIRST_WORD .. END - 1


def end_token_for(vocab):
    """END is the last id of the vocabulary (1548 for the Q&A's 1549 tokens)."""
    return vocab - 1


MIN_LEN, MAX_LEN = 2, 6  # source lengths
TARGET_LEN = 12  # the target sequence [START, ..., END, padding...] has this length

PRESETS = {
    "default": dict(vocab=300, samples=10000, epochs=10, latent=128, embed=64, batch=128),
    "quick": dict(vocab=100, samples=3500, epochs=7, latent=64, embed=32, batch=64),
}
HELD_OUT, MAX_HELD_OUT = 0.2, 1000  # sequences kept out of training for the measurements
LEARNING_RATE = 2e-3
N_EXAMPLES = 3  # held-out sequences printed per configuration

# name -> (loss, fix 1: PAD padding + mask_zero + zero weight on padding,
#          fix 2: END weighted by the ratio, description)
CONFIGS = {
    "mae": ("mae", False, False, "plain MAE (the Q&A's setting)"),
    "fix1": ("mae", True, False, "MAE + fix 1: PAD padding, mask_zero, padding weight 0"),
    "fix2": ("mae", False, True, "MAE + fix 2: END weighted by the ratio (sample_weight)"),
    "fix3": ("masked_mae", False, False, "fix 3: MaskedMAE(START, END)"),
    "fix1+3": ("masked_mae", True, False, "MaskedMAE + fix 1"),
    "fix2+3": ("masked_mae", False, True, "MaskedMAE + fix 2"),
    "cce": ("cce", False, False, "categorical cross-entropy"),
    "cce+fix1": ("cce", True, False, "categorical cross-entropy + fix 1"),
    "cce+3": ("masked_cce", False, False, "cce + the seed's mask: MaskedCrossentropy(START, END)"),
    "cce+fix1+3": ("masked_cce", True, False, "MaskedCrossentropy + fix 1"),
}
CCE_FAMILY = ["cce", "cce+fix1", "cce+3", "cce+fix1+3"]
MAE_FAMILY = ["mae", "fix1", "fix2", "fix3", "fix1+3", "fix2+3"]


def make_loss(kind, end_token):
    if kind == "mae":
        return keras.losses.MeanAbsoluteError()
    if kind == "masked_mae":
        return MaskedMAE(start_token=START, end_token=end_token)
    if kind == "cce":
        return keras.losses.CategoricalCrossentropy()
    if kind == "masked_cce":
        return MaskedCrossentropy(start_token=START, end_token=end_token)
    raise ValueError(kind)


# --- data ------------------------------------------------------------------


def make_data(n, vocab, rng):
    """Sources (PAD-padded ids) and target sequences [START, reversed..., END, END, ...]."""
    end = end_token_for(vocab)
    sources = np.full((n, MAX_LEN), PAD, dtype=np.int32)
    targets = np.full((n, TARGET_LEN), end, dtype=np.int32)
    targets[:, 0] = START
    for i in range(n):
        length = rng.integers(MIN_LEN, MAX_LEN + 1)
        words = rng.integers(FIRST_WORD, end, size=length)
        sources[i, :length] = words
        targets[i, 1 : length + 1] = words[::-1]
    return sources, targets


def pad_after_end(targets, end):
    """Fix 1's targets: everything after the first END becomes PAD."""
    after_end = np.cumsum(targets == end, axis=1) - (targets == end) > 0
    return np.where(after_end, PAD, targets).astype(np.int32)


def teacher_forcing(targets):
    """The decoder reads the target sequence up to step t and predicts step t + 1
    (the blog's decoder_input_data / decoder_target_data)."""
    return targets[:, :-1], targets[:, 1:]


def end_weight_ratio(decoder_targets, vocab, end):
    """The answer's class weight for END: mean count of the other classes that
    occur in the targets, divided by the count of END."""
    counts = np.bincount(decoder_targets.ravel(), minlength=vocab).astype(np.float64)
    others = np.delete(counts, end)
    return float(others[others > 0].mean() / counts[end])


def sample_weights(decoder_targets, end, fix1, fix2, ratio):
    """Per-timestep weights [n, steps], or None for unweighted configurations."""
    if fix1:
        return (decoder_targets != PAD).astype(np.float32)
    if fix2:
        return np.where(decoder_targets == end, ratio, 1.0).astype(np.float32)
    return None


def training_dataset(sources, decoder_inputs, decoder_targets, weights, vocab, batch, seed):
    """Batches of ((source, decoder input), one-hot target[, sample weight])."""
    if weights is None:
        ds = tf.data.Dataset.from_tensor_slices(((sources, decoder_inputs), decoder_targets))
        ds = ds.shuffle(len(sources), seed=seed, reshuffle_each_iteration=True).batch(batch)
        ds = ds.map(lambda x, y: (x, tf.one_hot(y, vocab)))
    else:
        ds = tf.data.Dataset.from_tensor_slices(
            ((sources, decoder_inputs), decoder_targets, weights)
        )
        ds = ds.shuffle(len(sources), seed=seed, reshuffle_each_iteration=True).batch(batch)
        ds = ds.map(lambda x, y, w: (x, tf.one_hot(y, vocab), w))
    return ds.prefetch(2)


# --- model -----------------------------------------------------------------


def build_models(vocab, embed, latent, mask_zero):
    """The training model and the two inference models that share its layers."""
    layers = keras.layers
    source = keras.Input(shape=(None,), dtype="int32", name="source")
    x = layers.Embedding(vocab, embed, mask_zero=True, name="source_embedding")(source)
    _, state_h, state_c = layers.LSTM(latent, return_state=True, name="encoder")(x)

    decoder_input = keras.Input(shape=(None,), dtype="int32", name="decoder_input")
    # Fix 1: mask_zero=True here; Keras carries the mask to the loss.
    decoder_embedding = layers.Embedding(
        vocab, embed, mask_zero=mask_zero, name="target_embedding"
    )
    decoder_lstm = layers.LSTM(latent, return_sequences=True, return_state=True, name="decoder")
    next_token = layers.Dense(vocab, activation="softmax", name="next_token")
    y, _, _ = decoder_lstm(decoder_embedding(decoder_input), initial_state=[state_h, state_c])
    model = keras.Model([source, decoder_input], next_token(y), name="seq2seq")

    # Inference (greedy decoding): encoder -> states; decoder one step at a time.
    encoder_model = keras.Model(source, [state_h, state_c], name="encoder_model")
    token = keras.Input(shape=(1,), dtype="int32", name="token")
    h_in = keras.Input(shape=(latent,), name="h")
    c_in = keras.Input(shape=(latent,), name="c")
    y, h_out, c_out = decoder_lstm(decoder_embedding(token), initial_state=[h_in, c_in])
    decoder_model = keras.Model([token, h_in, c_in], [next_token(y), h_out, c_out], name="step")
    return model, encoder_model, decoder_model


def make_greedy_decoder(encoder_model, decoder_model, steps):
    """sources -> `steps` greedily decoded ids: the encoder's states, then one
    decoder step at a time from START, each step's argmax fed back in. One
    tf.function (traced once per model; it reads the current weights), so a
    per-epoch evaluation costs one call instead of `steps` eager ones."""

    @tf.function(reduce_retracing=True)
    def decode(sources):
        h, c = encoder_model(sources, training=False)
        token = tf.fill([tf.shape(sources)[0], 1], START)
        out = []
        for _ in range(steps):
            probs, h, c = decoder_model([token, h, c], training=False)
            token = tf.argmax(probs[:, -1], axis=-1, output_type=tf.int32)[:, None]
            out.append(token[:, 0])
        return tf.stack(out, axis=1)

    return lambda sources: decode(tf.constant(sources, tf.int32)).numpy()


# --- measurements ----------------------------------------------------------


def finite_or_none(value):
    value = float(value)
    return value if math.isfinite(value) else None


def read_to_end(predictions, end):
    """A decoded sequence as a user reads it: up to its first END, END after that."""
    after_end = np.cumsum(predictions == end, axis=1) > 0
    return np.where(after_end, end, predictions)


def greedy_metrics(predictions, targets, end):
    """END share of the (read-to-END) predictions, accuracy where the target is
    not END, share of sequences decoded exactly. targets: END-padded."""
    pred = read_to_end(predictions, end)
    not_end = targets != end
    return {
        "end_share": float(np.mean(pred == end)),
        "non_end_acc": float(np.mean(pred[not_end] == targets[not_end])),
        "exact": float(np.mean(np.all(pred == targets, axis=1))),
    }


class EpochMonitor(keras.callbacks.Callback):
    """Times each epoch, then decodes the held-out set greedily; one line per epoch."""

    def __init__(self, name, epochs, measure, history):
        super().__init__()
        self.name, self.epochs, self.measure, self.history = name, epochs, measure, history

    def _record(self, epoch, loss, seconds):
        row = {"epoch": epoch, "loss": loss, "seconds": seconds, **self.measure()}
        self.history.append(row)
        loss_text = "-" if loss is None else f"{loss:.4g}"
        seconds_text = "-" if seconds is None else f"{seconds:.1f} s"
        print(
            f"  [{self.name}] epoch {epoch:2d}/{self.epochs}  loss {loss_text:>9}  "
            f"{seconds_text:>7}  held-out: END share {row['end_share']:.3f}  "
            f"non-END acc {row['non_end_acc']:.3f}  exact {row['exact']:.3f}",
            flush=True,
        )

    def on_train_begin(self, logs=None):
        self._record(0, None, None)

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self._start
        self._record(epoch + 1, finite_or_none(logs["loss"]), seconds)


def sequence_text(ids, end):
    """Ids as text, START as 'S', END as 'E', PAD as '_' (trailing runs shortened)."""
    ids = list(ids)
    n = len(ids)
    while n > 1 and ids[n - 1] in (end, PAD) and ids[n - 2] == ids[n - 1]:
        n -= 1
    names = {START: "S", end: "E", PAD: "_"}
    words = [names.get(t, str(t)) for t in ids[:n]]
    if n < len(ids):
        words.append(f"(x{len(ids) - n} more)")
    return "[" + " ".join(words) + "]"


# --- report ----------------------------------------------------------------


TABLE_COLUMNS = [
    "config",
    "setup",
    "END share",
    "non-END acc",
    "exact",
    "final loss",
    "s/epoch (median)",
]


def results_table(results):
    """The summary as a markdown table (printed and put in the README)."""
    lines = [
        "| " + " | ".join(TABLE_COLUMNS) + " |",
        "| " + " | ".join(["---"] * 2 + ["---:"] * (len(TABLE_COLUMNS) - 2)) + " |",
    ]
    for name, r in results.items():
        f = r["final"]
        loss = "nan" if f["loss"] is None else f"{f['loss']:.4g}"
        cells = [
            f"`{name}`",
            r["description"],
            f"{f['end_share']:.3f}",
            f"{f['non_end_acc']:.3f}",
            f"{f['exact']:.3f}",
            loss,
            f"{r['seconds_per_epoch']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


SAME = 0.02  # the conclusion calls a smaller change "about the same"


def _change(before, after, what):
    delta = after - before
    if abs(delta) < SAME:
        return f"{what} about the same ({before:.3f} -> {after:.3f})"
    return f"{what} {'up' if delta > 0 else 'down'} {before:.3f} -> {after:.3f}"


def conclusion(results, target_end_share):
    """Sentences derived from this run's numbers (thresholds stated in the text)."""
    final = {name: r["final"] for name, r in results.items()}
    lines = []

    def state(name):
        f = final[name]
        if f["end_share"] >= 0.95:
            verdict = "collapsed to END (END share >= 0.95)"
        elif f["end_share"] < 0.05 and f["non_end_acc"] < 0.05:
            verdict = (
                "the opposite failure: almost never predicts END (END share < 0.05) "
                "and learns almost no tokens"
            )
        elif f["non_end_acc"] < 0.05:
            verdict = "not collapsed, but learns almost no tokens (non-END acc < 0.05)"
        else:
            verdict = f"learns tokens (non-END acc {f['non_end_acc']:.3f})"
        return (
            f"{name}: END share {f['end_share']:.3f} (targets {target_end_share:.3f}), "
            f"non-END acc {f['non_end_acc']:.3f}, exact {f['exact']:.3f}: {verdict}."
        )

    for name in results:
        lines.append(state(name))
    if "mae" in final:
        for name in ("fix1", "fix2", "fix3"):
            if name in final:
                lines.append(
                    f"{name} vs plain MAE: "
                    + _change(final["mae"]["non_end_acc"], final[name]["non_end_acc"], "non-END acc")
                    + "; "
                    + _change(final["mae"]["end_share"], final[name]["end_share"], "END share")
                    + "."
                )
    for combo, base in (("fix1+3", "fix1"), ("fix2+3", "fix2"), ("cce+fix1", "cce"),
                        ("cce+3", "cce"), ("cce+fix1+3", "cce+fix1")):
        if combo in final and base in final:
            added = {"cce+fix1": "fix 1", "cce+3": "the seed's mask",
                     "cce+fix1+3": "the seed's mask"}.get(combo, "MaskedMAE")
            lines.append(
                f"Adding {added} to {base} ({combo}): "
                + _change(final[base]["non_end_acc"], final[combo]["non_end_acc"], "non-END acc")
                + "; "
                + _change(final[base]["exact"], final[combo]["exact"], "exact")
                + "."
            )
    mae_family = [n for n in MAE_FAMILY if n in final]
    cce_family = [n for n in CCE_FAMILY if n in final]
    best = lambda names: max(names, key=lambda n: (final[n]["non_end_acc"], final[n]["exact"]))  # noqa: E731
    if mae_family:
        b = best(mae_family)
        still = ", and even it learns almost no tokens" if final[b]["non_end_acc"] < 0.05 else ""
        lines.append(
            f"Best MAE-based configuration: {b} (non-END acc {final[b]['non_end_acc']:.3f}, "
            f"exact {final[b]['exact']:.3f}){still}."
        )
        if cce_family:
            c = best(cce_family)
            gap = final[c]["non_end_acc"] - final[b]["non_end_acc"]
            if gap > 0.05:
                verdict = "cross-entropy learns the task better than every MAE-based setup here"
            elif gap < -0.05:
                verdict = "the best MAE-based setup beats cross-entropy here"
            else:
                verdict = "the best MAE-based setup and cross-entropy are within 0.05 here"
            lines.append(
                f"Best cross-entropy configuration: {c} (non-END acc "
                f"{final[c]['non_end_acc']:.3f}, exact {final[c]['exact']:.3f}): {verdict}."
            )
    lines.append(
        f"(Thresholds: collapsed = END share >= 0.95; almost never END = END share < 0.05; "
        f"learns almost no tokens = non-END acc < 0.05; a change under {SAME} is called about "
        "the same. One seed, one run.)"
    )
    timed = {n: results[n]["seconds_per_epoch"] for n in results}
    if "mae" in timed and "fix3" in timed:
        lines.append(
            f"Time per epoch: plain MAE {timed['mae']:.2f} s, MaskedMAE (fused) "
            f"{timed['fix3']:.2f} s (the loss is a small part of a training step; the machine "
            "is shared, so timings are noisy)."
        )
    return lines


def save_outputs(out_dir, record):
    """demo_results.json (every number) and demo_results.png (curves and bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.abspath(os.path.join(out_dir, "demo_results.json"))
    png_path = os.path.abspath(os.path.join(out_dir, "demo_results.png"))
    with open(json_path, "w") as f:
        json.dump(record, f, indent=1)

    results = record["results"]
    names = list(results)
    colors = {n: plt.cm.tab10(i % 10) for i, n in enumerate(names)}
    styles = {n: ("--" if results[n]["mask_zero"] else "-") for n in names}
    fig, ((ax_loss, ax_end), (ax_acc, ax_bar)) = plt.subplots(2, 2, figsize=(14, 9))
    for name in names:
        style = dict(marker="o", ms=3, color=colors[name], linestyle=styles[name], label=name)
        rows = [row for row in results[name]["history"] if row["epoch"] > 0]
        losses = [row["loss"] if row["loss"] is not None else float("nan") for row in rows]
        ax_loss.plot([row["epoch"] for row in rows], losses, **style)
        rows = results[name]["history"]
        epochs = [row["epoch"] for row in rows]
        ax_end.plot(epochs, [row["end_share"] for row in rows], **style)
        ax_acc.plot(epochs, [row["non_end_acc"] for row in rows], **style)
    ax_end.axhline(
        record["task"]["heldout_target_end_share"],
        color="gray",
        linestyle=":",
        linewidth=1.5,
        label="END share of targets",
    )
    ax_end.set(
        title="held-out END share of greedy predictions (1.0 = collapse)",
        xlabel="epoch",
        ylim=(-0.02, 1.02),
    )
    ax_loss.set_yscale("log")
    ax_loss.set(title="training loss (each in its own units)", xlabel="epoch")
    ax_acc.set(
        title="held-out non-END token accuracy (greedy)", xlabel="epoch", ylim=(-0.02, 1.02)
    )
    metrics = [("end_share", "END share"), ("non_end_acc", "non-END acc"), ("exact", "exact")]
    width = 0.8 / len(metrics)
    x = np.arange(len(names))
    for i, (key, label) in enumerate(metrics):
        ax_bar.bar(
            x + (i - 1) * width,
            [results[n]["final"][key] for n in names],
            width,
            label=label,
            color=plt.cm.Set2(i),
        )
    ax_bar.axhline(
        record["task"]["heldout_target_end_share"],
        color="gray",
        linestyle="--",
        linewidth=1,
        label="END share of targets",
    )
    ax_bar.set_xticks(x, names)
    ax_bar.set(
        title=f"held-out, after {record['config']['epochs']} epochs (greedy)", ylim=(0, 1.05)
    )
    for ax in (ax_loss, ax_end, ax_acc, ax_bar):
        ax.grid(alpha=0.3)
    ax_loss.legend(fontsize=8, ncol=2)
    ax_end.legend(fontsize=8, ncol=2, loc="center left", bbox_to_anchor=(0.08, 0.45))
    ax_acc.legend(fontsize=8, ncol=2, loc="upper left")
    ax_bar.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=4)
    c = record["config"]
    fig.suptitle(
        f"seq2seq reverse task, vocab {c['vocab']}, {c['train_sequences']} train / "
        f"{c['heldout_sequences']} held-out sequences, same initial weights and batches "
        "(dashed: fix 1, mask_zero=True)"
    )
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
    return png_path, json_path


# --- main ------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="small run (vocab 100, 3500 sequences, 7 epochs)"
    )
    parser.add_argument("--epochs", type=int, help="epochs per configuration")
    parser.add_argument("--vocab", type=int, help="vocabulary size incl. PAD, START, END (<= 1549)")
    parser.add_argument(
        "--samples", type=int, help=f"sequences made (20%% held out, at most {MAX_HELD_OUT})"
    )
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help="comma list of " + ",".join(CONFIGS)
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--seeds",
        help="comma list of seeds: run every configuration once per seed (each seed's "
        "outputs in OUT/seed<k>/), then print a table of mean, standard deviation and range",
    )
    parser.add_argument(
        "--out",
        default="demo_output",
        help="directory for demo_results.png and demo_results.json (default: ./demo_output)",
    )
    args = parser.parse_args(argv)

    mode = "quick" if args.quick else "default"
    config = dict(PRESETS[mode], mode=mode)
    for key in ("epochs", "vocab", "samples"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    if not FIRST_WORD + 2 <= config["vocab"] <= 1549:
        parser.error(f"--vocab must be in [{FIRST_WORD + 2}, 1549]")
    if config["samples"] < 10 or config["epochs"] < 1:
        parser.error("--samples must be >= 10 and --epochs >= 1")
    names = [name.strip() for name in args.configs.split(",") if name.strip()]
    for name in names:
        if name not in CONFIGS:
            parser.error(f"unknown configuration {name!r}; choose from {','.join(CONFIGS)}")
    if not names:
        parser.error("--configs is empty")
    config.update(configs=names, seed=args.seed)
    if args.seeds:
        try:
            seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
        except ValueError:
            parser.error(f"--seeds must be a comma list of integers, got {args.seeds!r}")
        if not seeds or len(set(seeds)) != len(seeds):
            parser.error("--seeds must list distinct integers")
        config["seeds"] = seeds
    return config, args.out


SEEDS_COLUMNS = ["config", "setup", "END share", "non-END acc", "exact"]


def seeds_table(per_seed):
    """Mean ± standard deviation [min, max] over seeds, per configuration (markdown)."""
    seeds = list(per_seed)
    names = list(per_seed[seeds[0]]["results"])
    lines = [
        f"| {' | '.join(SEEDS_COLUMNS)} |",
        "| " + " | ".join(["---"] * 2 + ["---:"] * (len(SEEDS_COLUMNS) - 2)) + " |",
    ]
    summary = {}
    for name in names:
        cells = [f"`{name}`", per_seed[seeds[0]]["results"][name]["description"]]
        summary[name] = {}
        for key in ("end_share", "non_end_acc", "exact"):
            values = np.array([per_seed[s]["results"][name]["final"][key] for s in seeds])
            summary[name][key] = {"mean": float(values.mean()), "std": float(values.std(ddof=0)),
                                  "min": float(values.min()), "max": float(values.max()),
                                  "values": [float(v) for v in values]}
            cells.append(f"{values.mean():.3f} ± {values.std(ddof=0):.3f} "
                         f"[{values.min():.3f}, {values.max():.3f}]")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), summary


def main(argv=None):
    config, out_dir = parse_args(sys.argv[1:] if argv is None else argv)
    seeds = config.pop("seeds", None)
    if not seeds:
        return run(config, out_dir)
    per_seed = {}
    for seed in seeds:
        print(f"\n######## seed {seed} ({seeds.index(seed) + 1}/{len(seeds)}) ########",
              flush=True)
        per_seed[seed] = run(dict(config, seed=seed), os.path.join(out_dir, f"seed{seed}"))
    table, summary = seeds_table(per_seed)
    record = {"seeds": seeds, "config": dict(config, seeds=seeds), "summary": summary,
              "table": table,
              "seconds": {s: per_seed[s]["seconds_after_imports"] for s in seeds}}
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.abspath(os.path.join(out_dir, "demo_seeds.json"))
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"\nover seeds {', '.join(map(str, seeds))} (held-out, greedy, after "
          f"{config['epochs']} epochs): mean ± standard deviation [min, max]\n")
    print(table)
    print(f"\nwrote {path}", flush=True)
    return record


def run(config, out_dir):
    """One seed: every configuration, the table, the conclusion and the outputs."""
    vocab = config["vocab"]
    end = end_token_for(vocab)
    started = time.perf_counter()

    rng = np.random.default_rng(config["seed"])
    sources, targets = make_data(config["samples"], vocab, rng)
    n_val = min(MAX_HELD_OUT, max(1, int(round(HELD_OUT * config["samples"]))))
    train_sources, val_sources = sources[n_val:], sources[:n_val]
    _, val_targets = teacher_forcing(targets[:n_val])  # END-padded: what every config is scored on
    padded = {
        False: teacher_forcing(targets[n_val:]),  # END padding (the Q&A's)
        True: teacher_forcing(pad_after_end(targets[n_val:], end)),  # fix 1: PAD after END
    }
    ratio = end_weight_ratio(padded[False][1], vocab, end)
    train_end_share = float(np.mean(padded[False][1] == end))
    val_end_share = float(np.mean(val_targets == end))
    config.update(train_sequences=len(train_sources), heldout_sequences=n_val)

    print(
        f"fused_masked_mae {fused_masked_mae.__version__}, TensorFlow {tf.__version__}, "
        f"Keras {keras.__version__}, {os.cpu_count()} CPUs\n"
        f"mode {config['mode']}: vocab {vocab} (PAD={PAD}, START={START}, END={end}), "
        f"{len(train_sources)} train / {n_val} held-out sequences, {config['epochs']} epochs, "
        f"seed {config['seed']}\n"
        f"task: reverse {MIN_LEN}..{MAX_LEN} tokens; decoder targets have {TARGET_LEN - 1} steps, "
        f"{train_end_share:.1%} of them END with END padding\n"
        f"fix 2 weight for END: ratio = mean count of the other classes / count of END = {ratio:.5g}",
        flush=True,
    )

    keras.utils.set_random_seed(config["seed"])  # the initial weights
    models = {}
    for mask in (False, True):
        model, encoder_model, decoder_model = build_models(
            vocab, config["embed"], config["latent"], mask
        )
        models[mask] = (model, make_greedy_decoder(encoder_model, decoder_model, TARGET_LEN - 1))
    initial_weights = models[False][0].get_weights()  # every configuration starts from these

    results = {}
    for index, name in enumerate(config["configs"], 1):
        kind, fix1, fix2, description = CONFIGS[name]
        model, decode = models[fix1]
        loss = make_loss(kind, end)
        dec_in, dec_tgt = padded[fix1]
        weights = sample_weights(dec_tgt, end, fix1, fix2, ratio)
        print(
            f"\n== configuration {index}/{len(config['configs'])}: {name}: {description} "
            f"[{type(loss).__name__}"
            + (", mask_zero=True" if fix1 else "")
            + (", sample_weight" if weights is not None else "")
            + "] ==",
            flush=True,
        )
        keras.utils.set_random_seed(config["seed"])  # same batch order for every configuration
        model.set_weights(initial_weights)
        # For fix3 this is
        #   model.compile(optimizer=..., loss=MaskedMAE(start_token=START, end_token=END))
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate=LEARNING_RATE),
            loss=loss,
            jit_compile=False,  # the fused op, not the XLA composite, on every device
        )

        def measure():
            predictions = decode(val_sources)
            measure.last = predictions
            return greedy_metrics(predictions, val_targets, end)

        history = []
        t0 = time.perf_counter()
        model.fit(
            training_dataset(
                train_sources, dec_in, dec_tgt, weights, vocab, config["batch"], config["seed"]
            ),
            epochs=config["epochs"],
            shuffle=False,  # the dataset shuffles itself (seeded)
            verbose=0,
            callbacks=[EpochMonitor(name, config["epochs"], measure, history)],
        )
        config_seconds = time.perf_counter() - t0
        epoch_seconds = [row["seconds"] for row in history[1:]]
        examples = []
        for i in range(min(N_EXAMPLES, n_val)):
            src = [int(t) for t in val_sources[i] if t != PAD]
            target, prediction = val_targets[i].tolist(), measure.last[i].tolist()
            examples.append({"source": src, "target": target, "prediction": prediction})
            print(
                f"    source {sequence_text(src, end)}  target {sequence_text(target, end)}  "
                f"greedy {sequence_text(prediction, end)}",
                flush=True,
            )
        results[name] = {
            "description": description,
            "loss_class": type(loss).__name__,
            "mask_zero": fix1,
            "padding": "PAD" if fix1 else "END",
            "sample_weight": None if weights is None else ("padding 0" if fix1 else "END ratio"),
            "history": history,
            "final": history[-1],
            "epoch_seconds": epoch_seconds,
            "seconds_per_epoch": float(np.median(epoch_seconds)),  # first one traces
            "config_seconds": config_seconds,
            "examples": examples,
        }
        f = history[-1]
        print(
            f"  -> {name} done in {config_seconds:.1f} s: END share {f['end_share']:.3f}, "
            f"non-END acc {f['non_end_acc']:.3f}, exact {f['exact']:.3f}",
            flush=True,
        )

    table = results_table(results)
    lines = conclusion(results, val_end_share)
    total = time.perf_counter() - started
    record = {
        "config": config,
        "tokens": {"pad": PAD, "start": START, "end": end},
        "task": {
            "min_len": MIN_LEN,
            "max_len": MAX_LEN,
            "target_len": TARGET_LEN,
            "train_target_end_share": train_end_share,
            "heldout_target_end_share": val_end_share,
            "end_weight_ratio": ratio,
        },
        "versions": {
            "fused_masked_mae": fused_masked_mae.__version__,
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "python": platform.python_version(),
        },
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "results": results,
        "table": table,
        "conclusion": lines,
        "seconds_after_imports": total,
    }
    paths = save_outputs(out_dir, record)
    print(
        f"\nsummary after {config['epochs']} epochs, greedy decoding of {n_val} held-out "
        f"sequences ({val_end_share:.1%} of their target positions are END):\n"
    )
    print(table)
    print("\nconclusion (from this run's numbers):")
    for line in lines:
        print(f"- {line}")
    print(f"\nwrote {paths[0]}\nwrote {paths[1]}", flush=True)
    print(
        f"total {total:.1f} s after imports, {time.perf_counter() - PROCESS_START:.1f} s with them",
        flush=True,
    )
    return record


if __name__ == "__main__":
    main()
