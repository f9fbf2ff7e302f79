"""MaskedMAE and SparseMaskedMAE on every Keras 3 backend (TensorFlow, JAX, PyTorch).

Keras picks its backend at import, so each backend runs
tests/keras_backend_worker.py in a subprocess with KERAS_BACKEND set. On each:
the loss picks that backend's fused kernel once (the keras.ops composite only
when forced, logged once); `fit` per-epoch losses equal the keras.ops
composite's from the same initial weights within 1e-6 (dense, sparse, token
sets, masked inputs) and `jit_compile=True` equals eager; every reduction
with and without sample_weight; `.keras` save/load; mixed precision; clear
errors for bad inputs. `import fused_masked_mae` imports no framework.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "keras_backend_worker.py")
KERNELS = {
    "tensorflow": ("fused_masked_mae.ops", "fused_masked_mae.sparse"),
    "jax": ("fused_masked_mae.jax", "fused_masked_mae.jax"),
    "torch": ("fused_masked_mae.torch", "fused_masked_mae.torch"),
}


def run_worker(backend):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("FUSED_MASKED_MAE_KERAS", None)
    done = subprocess.run([sys.executable, WORKER], env=env, capture_output=True, text=True,
                          timeout=900, cwd=os.path.dirname(WORKER))
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-5000:]
    return json.loads(lines[-1][len("REPORT "):])


def close(a, b, tol=1e-6):
    if isinstance(a, list):
        return len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b))
    return abs(a - b) <= tol * max(1.0, abs(b))


@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_keras_backend(backend):
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    report = run_worker(backend)
    assert report["imported_by_package"] == []
    assert report["backend"] == backend
    assert (report["kernel"], report["sparse_kernel"]) == KERNELS[backend]
    # The composite only when forced, and said once per reason.
    assert report["composite_kernel"] == "composite_masked_mae_tokens"
    assert len(report["fallback_logs"]) == 1
    assert "FUSED_MASKED_MAE_KERAS=composite" in report["fallback_logs"][0]
    for name, runs in report["fit"].items():
        assert close(runs["fused"], runs["composite"]), (name, runs)
        if "fused_jit" in runs:
            assert close(runs["fused_jit"], runs["fused"]), (name, runs)
    # Masked inputs change the loss (the mask reaches it).
    assert report["fit"]["masked_inputs"]["fused"] != report["fit"]["dense"]["fused"]
    for key, (fused, composite, sparse) in report["reductions"].items():
        assert close(fused, composite), key
        assert close(sparse, fused), key
    assert not close(report["reductions"]["sum/False"][0],
                     report["reductions"]["sum_over_batch_size/False"][0])
    saved = report["saved"]
    assert saved["class"] == "MaskedMAE" and saved["kernel"] == KERNELS[backend][0]
    assert saved["config"]["tokens"] == [0] and saved["config"]["name"] == "mmae"
    assert saved["evaluate"][0] == saved["evaluate"][1]
    for policy, losses in report["mixed"].items():
        assert all(0 < v < 1 for v in losses), (policy, losses)
    assert "same shape" in report["bad_shape"] and "[2, 3]" in report["bad_shape"].replace(
        "[2,3]", "[2, 3]")
    assert "outside [0, 11)" in report["bad_id"] and "= 12" in report["bad_id"]
