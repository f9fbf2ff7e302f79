"""examples/seq2seq_demo.py: its --quick mode run as a user would (a fresh
interpreter, the installed package, an unrelated working directory), checked
for structure and finiteness only, never for particular values; and its
helpers (padding, the answer's END weight, reading a prediction up to END, the
generated conclusion) on small hand-made inputs."""

import importlib.util
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

DEMO = pathlib.Path(__file__).resolve().parents[1] / "examples" / "seq2seq_demo.py"
CONFIGS = ["mae", "fix1", "fix2", "fix3", "fix1+3", "fix2+3", "cce", "cce+fix1", "cce+3",
           "cce+fix1+3"]
QUICK_EPOCHS = 7
TABLE_HEADER = "| config | setup | END share | non-END acc | exact | final loss | s/epoch (median) |"


def run_demo(args, cwd, timeout=600):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(
        [sys.executable, str(DEMO), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("demo")
    out = cwd / "out"
    proc = run_demo(["--quick", "--out", str(out)], cwd=cwd)
    assert proc.returncode == 0, f"demo failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc, out


def all_numbers(value, path="$"):
    """(path, number) for every number in a JSON value."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, (int, float)):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from all_numbers(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from all_numbers(item, f"{path}[{i}]")


def test_quick_prints_progress_and_one_table(quick_run):
    proc, _ = quick_run
    lines = proc.stdout.splitlines()
    for i, name in enumerate(CONFIGS, 1):
        assert any(
            line.startswith(f"== configuration {i}/{len(CONFIGS)}: {name}: ") for line in lines
        ), name
        for epoch in range(QUICK_EPOCHS + 1):
            assert any(
                line.strip().startswith(f"[{name}] epoch {epoch:2d}/{QUICK_EPOCHS} ") for line in lines
            ), (name, epoch)
        assert any(line.startswith(f"  -> {name} done in ") for line in lines), name

    assert lines.count(TABLE_HEADER) == 1
    start = lines.index(TABLE_HEADER)
    rows = lines[start + 2 : start + 2 + len(CONFIGS)]
    assert re.fullmatch(r"\|( ---:? \|)+", lines[start + 1])
    assert not lines[start + 2 + len(CONFIGS)].startswith("|")  # nothing more in the table
    columns = TABLE_HEADER.count("|") - 1
    for name, row in zip(CONFIGS, rows):
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert len(cells) == columns, row
        assert cells[0] == f"`{name}`"
        numbers = [float(cell) for cell in cells[2:]]
        assert all(math.isfinite(x) for x in numbers), row
        assert all(0.0 <= x <= 1.0 for x in numbers[:3]), row  # END share, non-END acc, exact

    conclusion = lines[lines.index("conclusion (from this run's numbers):") + 1 :]
    assert conclusion and conclusion[0].startswith("- mae: END share ")


def test_quick_writes_json_with_finite_numbers_and_a_png(quick_run):
    proc, out = quick_run
    json_path, png_path = out / "demo_results.json", out / "demo_results.png"
    assert f"wrote {png_path}" in proc.stdout and f"wrote {json_path}" in proc.stdout
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    data = json.loads(json_path.read_text())
    numbers = list(all_numbers(data))
    assert numbers
    bad = [(path, x) for path, x in numbers if not math.isfinite(x)]
    assert not bad, bad
    assert data["config"]["mode"] == "quick" and data["config"]["epochs"] == QUICK_EPOCHS
    assert list(data["results"]) == CONFIGS
    assert data["table"] in proc.stdout
    assert data["conclusion"] and all(line in proc.stdout for line in data["conclusion"])
    assert 0.0 < data["task"]["end_weight_ratio"] < 1.0

    for name, r in data["results"].items():
        history = r["history"]
        assert [row["epoch"] for row in history] == list(range(QUICK_EPOCHS + 1))  # 0: untrained
        assert history[0]["loss"] is None
        for row in history[1:]:
            assert row["loss"] is not None and row["loss"] >= 0 and row["seconds"] > 0
        for row in history:
            for key in ("end_share", "non_end_acc", "exact"):
                assert 0.0 <= row[key] <= 1.0
        assert r["final"] == history[-1]
        assert len(r["epoch_seconds"]) == QUICK_EPOCHS
        # Our fused loss wherever a configuration uses ours.
        expected = {"mae": "MeanAbsoluteError", "masked_mae": "MaskedMAE",
                    "cce": "CategoricalCrossentropy", "masked_cce": "MaskedCrossentropy"}
        if name.startswith("cce"):
            kind = "masked_cce" if "3" in name else "cce"
        else:
            kind = "masked_mae" if "3" in name else "mae"
        assert r["loss_class"] == expected[kind], name
        assert r["mask_zero"] == ("fix1" in name)

    # Every configuration starts from the same initial weights: identical
    # untrained measurements among the configurations sharing a model.
    for mask_zero in (False, True):
        firsts = {
            json.dumps({k: v for k, v in r["history"][0].items()}, sort_keys=True)
            for r in data["results"].values()
            if r["mask_zero"] == mask_zero
        }
        assert len(firsts) == 1, firsts


def test_rejects_unknown_configuration(tmp_path):
    proc = run_demo(["--configs", "fix3,nope", "--out", str(tmp_path)], cwd=tmp_path, timeout=240)
    assert proc.returncode == 2
    assert "unknown configuration 'nope'" in proc.stderr


# --- helpers, without training ------------------------------------------------


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("seq2seq_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fix1_padding_and_fix2_ratio(demo):
    end = 9
    targets = np.array([[2, 5, 6, end, end, end], [2, 7, end, end, end, end]], np.int32)
    np.testing.assert_array_equal(
        demo.pad_after_end(targets, end), [[2, 5, 6, end, 0, 0], [2, 7, end, 0, 0, 0]]
    )
    _, decoder_targets = demo.teacher_forcing(targets)  # [[5 6 E E E] [7 E E E E]]
    # Other classes that occur: 5, 6, 7 once each (mean 1); END 7 times.
    assert demo.end_weight_ratio(decoder_targets, 10, end) == pytest.approx(1 / 7)
    w = demo.sample_weights(decoder_targets, end, fix1=False, fix2=True, ratio=0.25)
    np.testing.assert_allclose(w, np.where(decoder_targets == end, 0.25, 1.0))
    _, padded = demo.teacher_forcing(demo.pad_after_end(targets, end))
    w = demo.sample_weights(padded, end, fix1=True, fix2=False, ratio=0.25)
    np.testing.assert_array_equal(w, [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    assert demo.sample_weights(decoder_targets, end, False, False, 0.25) is None


def test_greedy_metrics_read_predictions_up_to_end(demo):
    end = 9
    targets = np.array([[5, 6, end, end], [7, 8, end, end]])
    predictions = np.array([[5, 6, end, 3], [7, 4, end, 2]])  # after the first END: ignored
    read = demo.read_to_end(predictions, end)
    np.testing.assert_array_equal(read, [[5, 6, end, end], [7, 4, end, end]])
    m = demo.greedy_metrics(predictions, targets, end)
    assert m == {"end_share": 4 / 8, "non_end_acc": 3 / 4, "exact": 1 / 2}
    collapsed = demo.greedy_metrics(np.full_like(targets, end), targets, end)
    assert collapsed == {"end_share": 1.0, "non_end_acc": 0.0, "exact": 0.0}


def test_conclusion_is_written_from_the_numbers(demo):
    def result(end_share, non_end_acc, exact, seconds=1.0):
        final = {"end_share": end_share, "non_end_acc": non_end_acc, "exact": exact}
        return {"final": final, "seconds_per_epoch": seconds}

    results = {
        "mae": result(1.0, 0.0, 0.0),
        "fix3": result(0.5, 0.625, 0.25),
        "cce": result(0.6, 0.3125, 0.125),
    }
    text = "\n".join(demo.conclusion(results, 0.6))
    assert "mae: END share 1.000" in text and "collapsed to END" in text
    assert "fix3 vs plain MAE: non-END acc up 0.000 -> 0.625" in text
    assert "Best MAE-based configuration: fix3" in text
    assert "the best MAE-based setup beats cross-entropy here" in text
    results["cce"] = result(0.6, 0.9, 0.8)
    results["fix3"] = result(0.01, 0.03, 0.0)
    text = "\n".join(demo.conclusion(results, 0.6))
    assert "cross-entropy learns the task better than every MAE-based setup here" in text
    assert "fix3: END share 0.010" in text and "almost never predicts END" in text
    assert "Best MAE-based configuration: fix3" in text and "even it learns almost no tokens" in text


def test_seeds_table_reports_mean_spread_and_range(demo):
    def record(values):
        return {"results": {name: {"description": name.upper(), "final": {
            "end_share": v, "non_end_acc": v / 2, "exact": v / 4}} for name, v in values.items()}}

    per_seed = {0: record({"cce": 0.5, "cce+3": 0.8}), 3: record({"cce": 0.7, "cce+3": 0.6})}
    table, summary = demo.seeds_table(per_seed)
    lines = table.splitlines()
    assert lines[0] == "| config | setup | END share | non-END acc | exact |"
    assert lines[2] == ("| `cce` | CCE | 0.600 ± 0.100 [0.500, 0.700] | 0.300 ± 0.050 "
                        "[0.250, 0.350] | 0.150 ± 0.025 [0.125, 0.175] |")
    assert summary["cce+3"]["end_share"]["values"] == [0.8, 0.6]
    assert summary["cce+3"]["exact"]["mean"] == pytest.approx(0.175)


def test_rejects_bad_seeds(tmp_path):
    proc = run_demo(["--seeds", "0,x", "--out", str(tmp_path)], cwd=tmp_path, timeout=240)
    assert proc.returncode == 2
    assert "--seeds must be a comma list of integers" in proc.stderr
