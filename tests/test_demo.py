"""Runs examples/seq2seq_demo.py in a tiny configuration as a user would: a fresh
interpreter (sys.executable), the installed package, an unrelated working
directory; checks that it trains with the fused MaskedMAE and writes its outputs."""

import json
import math
import os
import pathlib
import subprocess
import sys

DEMO = pathlib.Path(__file__).resolve().parents[1] / "examples" / "seq2seq_demo.py"
EPOCHS = 2


def run_demo(args, cwd):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(
        [sys.executable, str(DEMO), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_demo_tiny_run_writes_results_and_plot(tmp_path):
    out = tmp_path / "out"
    proc = run_demo(
        ["--samples", "80", "--epochs", str(EPOCHS), "--vocab", "24", "--seed", "3"]
        + ["--out", str(out)],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, f"demo failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    json_path, png_path = out / "results.json", out / "curves.png"
    assert f"wrote {png_path}" in proc.stdout and f"wrote {json_path}" in proc.stdout
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    data = json.loads(json_path.read_text())
    assert data["config"]["epochs"] == EPOCHS and data["config"]["vocab"] == 24
    assert data["tokens"] == {"pad": 0, "start": 2, "end": 23}
    results = data["results"]
    steps = data["task"]["target_len"] - 1  # decoder steps
    assert {"mae", "masked_mae", "cce"} <= set(results)

    masked = results["masked_mae"]
    assert masked["loss_class"] == "MaskedMAE"
    history = masked["history"]
    assert [row["epoch"] for row in history] == list(range(EPOCHS + 1))  # 0 = before training
    for row in history[1:]:
        assert isinstance(row["loss"], float) and math.isfinite(row["loss"]) and row["loss"] >= 0
    for r in results.values():
        for row in r["history"]:
            assert 0.0 <= row["end_share"] <= 1.0 and 0.0 <= row["non_end_acc"] <= 1.0
        assert 0.0 <= r["greedy_exact"] <= 1.0
        example = r["examples"][0]
        assert len(example["prediction"]) == len(example["target"]) == steps

    # Every loss starts from the same initial weights: identical epoch-0 measurements.
    firsts = {
        (r["history"][0]["end_share"], r["history"][0]["non_end_acc"]) for r in results.values()
    }
    assert len(firsts) == 1, firsts
    assert "summary after" in proc.stdout and "masked_mae" in proc.stdout


def test_demo_rejects_unknown_loss(tmp_path):
    proc = run_demo(["--losses", "masked_mae,nope", "--out", str(tmp_path)], cwd=tmp_path)
    assert proc.returncode == 2
    assert "unknown loss 'nope'" in proc.stderr
