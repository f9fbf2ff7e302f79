"""Seq2seq with one-hot outputs: plain MAE vs. MaskedMAE vs. cross-entropy.

The story (a Q&A about Keras seq2seq models): an LSTM encoder-decoder in the
style of the Keras blog's "ten-minute introduction to sequence-to-sequence
learning" (teacher forcing, one softmax over the vocabulary per output step,
one-hot targets) is trained with mean absolute error. Its targets are padded
with the end token up to a fixed length, like

    [2 (start), 3, 123, 1548 (end), 1548, 1548, 1548, 1548, 1548, 1548]

so most target positions are end tokens, and the model ends up predicting the
end token everywhere. The answer's "solution 3" is a masked MAE: a position
costs nothing when the target's argmax equals the prediction's argmax and that
is the start or the end token; every other position costs mean |p - t| over
the classes. `fused_masked_mae.MaskedMAE` computes that in one fused op:

    from fused_masked_mae import MaskedMAE
    model.compile(optimizer="adam", loss=MaskedMAE(start_token=START, end_token=END))

What this script does:
  1. makes a synthetic task: reverse a random sequence of 2..6 tokens; the
     target sequence is [START, reversed tokens..., END, END, ...], padded with
     END to a fixed length (12), so about two thirds of the targets are END.
     As in the blog, the decoder reads the target sequence and predicts it one
     step ahead, so START is a decoder input and never a decoder target: here
     only the END part of the mask ever applies;
  2. builds the encoder-decoder once, saves its initial weights, and trains it
     (same seed, same initial weights, same batches) with each loss: plain MAE,
     MaskedMAE, categorical cross-entropy (the usual choice, as a baseline),
     and SparseMaskedMAE when the installed fused_masked_mae has it;
  3. after every epoch measures on held-out data, under teacher forcing, the
     share of predicted tokens (argmax) that are END ("end share": 1.0 is the
     collapse of the story; a perfect model matches the share of END in the
     targets) and the token accuracy where the target is not END ("non-end
     acc"); prints a row per epoch;
  4. decodes a few held-out sources greedily (encoder states, then one decoder
     step at a time, as in the blog) and prints source / target / prediction;
  5. writes curves.png and results.json into --out and prints their paths.

It reports whatever happens; nothing is tuned per loss (the same optimizer,
learning rate, data and epochs for all of them).

Run (the package installed, or PYTHONPATH pointing at it):
    python examples/seq2seq_demo.py          # quick mode, the default: vocab 300,
                                             # ~1.5 min on 2 CPU cores
    python examples/seq2seq_demo.py --full   # vocab 1549 (the Q&A's), 24000 sequences, 15
                                             # epochs: ~17 s per epoch per loss on 2 CPU cores
    python examples/seq2seq_demo.py --epochs 5 --vocab 200 --samples 2000 --losses mae,masked_mae
    ./build.sh demo                          # quick mode against the built wheel
"""

import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

import numpy as np  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import fused_masked_mae  # noqa: E402
from fused_masked_mae import MaskedMAE  # noqa: E402

# Token ids. 0 pads the encoder input (masked there); the decoder never sees it.
# With --vocab 1549 START and END are the Q&A's 2 and 1548.
PAD = 0
START = 2
FIRST_WORD = 3  # word tokens are FIRST_WORD .. END - 1


def end_token_for(vocab):
    """END is the last id of the vocabulary (1548 for the Q&A's 1549 tokens)."""
    return vocab - 1


MIN_LEN, MAX_LEN = 2, 6  # source lengths
TARGET_LEN = 12  # the target sequence [START, ..., END, END, ...] has this length

PRESETS = {
    "quick": dict(vocab=300, samples=10000, epochs=12, latent=128, embed=64, batch=128),
    "full": dict(vocab=1549, samples=24000, epochs=15, latent=256, embed=128, batch=128),
}
HELD_OUT, MAX_HELD_OUT = 0.2, 2000  # sequences kept out of training for the measurements
LEARNING_RATE = 2e-3
N_EXAMPLES = 4  # held-out sequences decoded greedily per loss

HAS_SPARSE = hasattr(fused_masked_mae, "SparseMaskedMAE")
ALL_LOSSES = ["mae", "masked_mae", "cce"] + (["sparse_masked_mae"] if HAS_SPARSE else [])


def make_loss(name, end_token):
    """The loss object for a --losses name, and whether it takes token ids as targets."""
    if name == "mae":
        return keras.losses.MeanAbsoluteError(), False
    if name == "masked_mae":
        return MaskedMAE(start_token=START, end_token=end_token), False
    if name == "cce":
        return keras.losses.CategoricalCrossentropy(), False
    if name == "sparse_masked_mae":
        return fused_masked_mae.SparseMaskedMAE(start_token=START, end_token=end_token), True
    raise ValueError(name)


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
    # Teacher forcing: the decoder reads the target sequence up to step t and
    # predicts step t + 1 (the blog's decoder_input_data / decoder_target_data).
    decoder_inputs = targets[:, :-1]
    decoder_targets = targets[:, 1:]
    return sources, decoder_inputs, decoder_targets


def training_dataset(sources, decoder_inputs, decoder_targets, vocab, batch, seed, sparse):
    """Batches of ((source, decoder input), target), targets one-hot (made per batch)."""
    ds = tf.data.Dataset.from_tensor_slices(((sources, decoder_inputs), decoder_targets))
    ds = ds.shuffle(len(sources), seed=seed, reshuffle_each_iteration=True).batch(batch)
    if not sparse:
        ds = ds.map(lambda x, y: (x, tf.one_hot(y, vocab)))
    return ds.prefetch(2)


# --- model -----------------------------------------------------------------


def build_models(vocab, embed, latent):
    """The training model and the two inference models that share its layers."""
    layers = keras.layers
    source = keras.Input(shape=(None,), dtype="int32", name="source")
    x = layers.Embedding(vocab, embed, mask_zero=True, name="source_embedding")(source)
    _, state_h, state_c = layers.LSTM(latent, return_state=True, name="encoder")(x)

    decoder_input = keras.Input(shape=(None,), dtype="int32", name="decoder_input")
    decoder_embedding = layers.Embedding(vocab, embed, name="target_embedding")
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


def greedy_decode(encoder_model, decoder_model, sources, steps):
    """Feeds each step's argmax back in, starting from START (a batch at a time)."""
    h, c = encoder_model(sources, training=False)
    token = np.full((len(sources), 1), START, dtype=np.int32)
    out = []
    for _ in range(steps):
        probs, h, c = decoder_model([tf.constant(token), h, c], training=False)
        probs = keras.ops.convert_to_numpy(probs)[:, -1]  # [batch, vocab]
        token = np.argmax(probs, axis=-1).astype(np.int32)[:, None]
        out.append(token[:, 0])
    return np.stack(out, axis=1)


# --- measurements ----------------------------------------------------------


def finite_or_none(value):
    value = float(value)
    return value if math.isfinite(value) else None


def teacher_forced_metrics(model, inputs, targets, end):
    """Share of argmax predictions that are END; accuracy where the target is not END."""
    pred = model.predict(inputs, batch_size=512, verbose=0).argmax(axis=-1)
    not_end = targets != end
    return {
        "end_share": float(np.mean(pred == end)),
        "non_end_acc": float(np.mean(pred[not_end] == targets[not_end])),
    }


class HeldOutMetrics(keras.callbacks.Callback):
    """Measures the held-out set before training and after every epoch; prints a row."""

    def __init__(self, inputs, targets, end, history):
        super().__init__()
        self.inputs, self.targets, self.end, self.history = inputs, targets, end, history

    def _record(self, epoch, loss, seconds):
        row = {"epoch": epoch, "loss": loss, "seconds": seconds}
        row.update(teacher_forced_metrics(self.model, self.inputs, self.targets, self.end))
        self.history.append(row)
        loss_text = "-" if loss is None else f"{loss:.5g}"
        seconds_text = "" if seconds is None else f"{seconds:5.1f}"
        print(
            f"  {epoch:5d}  {loss_text:>10}  {row['end_share']:9.3f}  {row['non_end_acc']:11.3f}"
            f"  {seconds_text}",
            flush=True,
        )

    def on_train_begin(self, logs=None):
        header = f"  {'epoch':>5}  {'loss':>10}  {'end share':>9}  {'non-end acc':>11}  {'sec':>5}"
        print(header, flush=True)
        self._record(0, None, None)

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self._record(epoch + 1, finite_or_none(logs["loss"]), time.perf_counter() - self._start)


def sequence_text(ids, end):
    """Ids as text, START as 'S' and END as 'E' (trailing END runs shortened)."""
    ids = list(ids)
    n = len(ids)
    while n > 1 and ids[n - 1] == end and ids[n - 2] == end:
        n -= 1
    words = ["S" if t == START else "E" if t == end else str(t) for t in ids[:n]]
    if n < len(ids):
        words.append(f"(E x{len(ids) - n} more)")
    return "[" + " ".join(words) + "]"


def greedy_metrics(predictions, targets, end):
    """Share of sequences decoded exactly (END padding included) and share that start with END."""
    exact = np.all(predictions == targets, axis=1)
    return {
        "greedy_exact": float(np.mean(exact)),
        "greedy_first_is_end": float(np.mean(predictions[:, 0] == end)),
    }


# --- main ------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small run (the default)")
    mode.add_argument("--full", action="store_true", help="vocab 1549, more data and epochs")
    parser.add_argument("--epochs", type=int, help="epochs per loss")
    parser.add_argument("--vocab", type=int, help="vocabulary size incl. PAD, START, END (<= 1549)")
    parser.add_argument(
        "--samples", type=int, help=f"sequences made (20%% held out, at most {MAX_HELD_OUT})"
    )
    parser.add_argument(
        "--losses", default=",".join(ALL_LOSSES), help="comma list of " + ",".join(ALL_LOSSES)
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default="demo_output", help="directory for curves.png and results.json"
    )
    args = parser.parse_args(argv)

    config = dict(PRESETS["full" if args.full else "quick"])
    config["mode"] = "full" if args.full else "quick"
    for key in ("epochs", "vocab", "samples"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    if not FIRST_WORD + 2 <= config["vocab"] <= 1549:
        parser.error(f"--vocab must be in [{FIRST_WORD + 2}, 1549]")
    if config["samples"] < 10 or config["epochs"] < 1:
        parser.error("--samples must be >= 10 and --epochs >= 1")
    losses = [name.strip() for name in args.losses.split(",") if name.strip()]
    for name in losses:
        if name not in ALL_LOSSES:
            extra = ""
            if name == "sparse_masked_mae":
                extra = " (this fused_masked_mae has no SparseMaskedMAE)"
            parser.error(f"unknown loss {name!r}{extra}; choose from {','.join(ALL_LOSSES)}")
    config.update(losses=losses, seed=args.seed)
    return config, args.out


def main(argv=None):
    config, out_dir = parse_args(sys.argv[1:] if argv is None else argv)
    vocab = config["vocab"]
    end = end_token_for(vocab)
    keras.utils.set_random_seed(config["seed"])
    started = time.perf_counter()

    rng = np.random.default_rng(config["seed"])
    sources, dec_in, dec_tgt = make_data(config["samples"], vocab, rng)
    n_val = min(MAX_HELD_OUT, max(1, int(round(HELD_OUT * config["samples"]))))
    train = (sources[n_val:], dec_in[n_val:], dec_tgt[n_val:])
    val_inputs, val_targets = (sources[:n_val], dec_in[:n_val]), dec_tgt[:n_val]
    target_end_share = float(np.mean(dec_tgt == end))

    print(
        f"fused_masked_mae {fused_masked_mae.__version__}, TensorFlow {tf.__version__}, "
        f"Keras {keras.__version__}\n"
        f"mode {config['mode']}: vocab {vocab} (START={START}, END={end}), "
        f"{len(train[0])} train / {n_val} held-out sequences, {config['epochs']} epochs, "
        f"losses {','.join(config['losses'])}, seed {config['seed']}\n"
        f"task: reverse {MIN_LEN}..{MAX_LEN} tokens; decoder targets have {TARGET_LEN - 1} steps, "
        f"{target_end_share:.1%} of them END",
        flush=True,
    )

    model, encoder_model, decoder_model = build_models(vocab, config["embed"], config["latent"])
    initial_weights = model.get_weights()  # every loss starts from these

    results = {}
    for name in config["losses"]:
        loss, sparse = make_loss(name, end)
        print(f"\n== {name}: {type(loss).__name__} ==", flush=True)
        keras.utils.set_random_seed(config["seed"])  # same batch order for every loss
        model.set_weights(initial_weights)
        # For masked_mae this is
        #   model.compile(optimizer=..., loss=MaskedMAE(start_token=START, end_token=END))
        model.compile(optimizer=keras.optimizers.Adam(learning_rate=LEARNING_RATE), loss=loss)
        history = []
        t0 = time.perf_counter()
        model.fit(
            training_dataset(*train, vocab, config["batch"], config["seed"], sparse),
            epochs=config["epochs"],
            shuffle=False,  # the dataset shuffles itself (seeded)
            verbose=0,
            callbacks=[HeldOutMetrics(val_inputs, val_targets, end, history)],
        )
        train_seconds = time.perf_counter() - t0

        predictions = greedy_decode(encoder_model, decoder_model, val_inputs[0], TARGET_LEN - 1)
        examples = []
        print("  greedy decoding of held-out sequences:", flush=True)
        for i in range(min(N_EXAMPLES, n_val)):
            src = [int(t) for t in val_inputs[0][i] if t != PAD]
            target, prediction = val_targets[i].tolist(), predictions[i].tolist()
            examples.append({"source": src, "target": target, "prediction": prediction})
            print(
                f"    source {sequence_text(src, end)}\n"
                f"    target {sequence_text(val_targets[i], end)}\n"
                f"    greedy {sequence_text(predictions[i], end)}",
                flush=True,
            )
        results[name] = {
            "loss_class": type(loss).__name__,
            "history": history,
            "train_seconds": train_seconds,
            **greedy_metrics(predictions, val_targets, end),
            "examples": examples,
        }

    paths = save_outputs(out_dir, config, target_end_share, results)
    print(
        f"\nsummary after {config['epochs']} epochs "
        f"(held-out; {target_end_share:.1%} of the targets are END):"
    )
    header = f"  {'loss':<18} {'end share':>9} {'non-end acc':>11} {'greedy exact':>12}"
    print(header + f" {'train s':>7}")
    for name, r in results.items():
        last = r["history"][-1]
        print(
            f"  {name:<18} {last['end_share']:9.3f} {last['non_end_acc']:11.3f} "
            f"{r['greedy_exact']:12.3f} {r['train_seconds']:7.1f}"
        )
    print(f"wrote {paths[0]}\nwrote {paths[1]}", flush=True)
    print(f"total {time.perf_counter() - started:.1f} s (after imports)", flush=True)
    return results


def save_outputs(out_dir, config, target_end_share, results):
    """results.json (all numbers) and curves.png (end share and non-end accuracy per epoch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.abspath(os.path.join(out_dir, "results.json"))
    png_path = os.path.abspath(os.path.join(out_dir, "curves.png"))
    with open(json_path, "w") as f:
        json.dump(
            {
                "config": config,
                "tokens": {"pad": PAD, "start": START, "end": end_token_for(config["vocab"])},
                "task": {
                    "min_len": MIN_LEN,
                    "max_len": MAX_LEN,
                    "target_len": TARGET_LEN,
                    "target_end_share": target_end_share,
                },
                "versions": {
                    "fused_masked_mae": fused_masked_mae.__version__,
                    "tensorflow": tf.__version__,
                    "keras": keras.__version__,
                },
                "results": results,
            },
            f,
            indent=1,
        )

    fig, (ax_end, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        epochs = [row["epoch"] for row in r["history"]]
        ax_end.plot(epochs, [row["end_share"] for row in r["history"]], marker="o", label=name)
        ax_acc.plot(epochs, [row["non_end_acc"] for row in r["history"]], marker="o", label=name)
    ax_end.axhline(target_end_share, color="gray", linestyle="--", label="END share of targets")
    ax_end.set(title="predicted tokens that are END (held-out)", xlabel="epoch")
    ax_acc.set(title="accuracy where the target is not END (held-out)", xlabel="epoch")
    for ax in (ax_end, ax_acc):
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"seq2seq reverse task, vocab {config['vocab']}, teacher-forced argmax")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path, json_path


if __name__ == "__main__":
    main()
