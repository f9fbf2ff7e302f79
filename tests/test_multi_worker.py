"""tf.distribute.MultiWorkerMirroredStrategy with two worker processes on
127.0.0.1: the fused loss trains to the same losses and weights as one process
over the same global batches.

- tf_keras' `fit` with `TfKerasMaskedMAE` (Keras 3.15's `fit` fails under this
  strategy with any loss, its own `MeanAbsoluteError` included: "Attempt to
  convert a value (PerReplica...) to a Tensor");
- a Keras 3 model trained by a custom loop with `MaskedMAE`, the per-replica
  loss and gradient run eagerly-traced and jit-compiled (the XLA custom calls).
  (tf_keras' `fit(jit_compile=True)` fails under this strategy with its own
  MAE too: its gradient all-reduce cannot be compiled by XLA on CPU.)

Each worker is a subprocess (tests/multi_worker_worker.py) with TF_CONFIG
naming two free loopback ports. The harness bounds the time, fails with a dead
worker's own error as soon as one dies (its peer would otherwise wait for it
in a collective), and kills every worker it started on any failure.

Tolerance: the workers all-reduce the two halves' gradients (a + b), where one
process sums the same per-example terms in one reduction; float32 rounding
differs at about 1e-7 relative per step and Adam carries it over the steps, so
losses are compared to rtol 1e-5 and weights to atol 1e-5 (weights are O(0.1)).
The two workers apply the same all-reduced gradients to the same weights, so
they must agree exactly with each other.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("multi_worker_worker.py")
DEADLINE_SECONDS = 240


class WorkerFailed(AssertionError):
    pass


def free_loopback_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def run_workers(args, count=2, deadline=DEADLINE_SECONDS):
    """Runs `count` workers of a MultiWorkerMirroredStrategy cluster on
    loopback ports and returns their parsed RESULT lines, or raises
    WorkerFailed with the first failing worker's stderr. No worker outlives
    this call."""
    ports = free_loopback_ports(count)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for index in range(count):
                env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_CONFIG=json.dumps(
                    {"cluster": cluster, "task": {"type": "worker", "index": index}}))
                out = open(Path(tmp, f"{index}.out"), "w")
                err = open(Path(tmp, f"{index}.err"), "w")
                procs.append((subprocess.Popen([sys.executable, str(WORKER), *args], env=env,
                                               stdout=out, stderr=err, stdin=subprocess.DEVNULL),
                              out, err))
            end = time.monotonic() + deadline
            while any(p.poll() is None for p, _, _ in procs):
                for index, (p, _, err) in enumerate(procs):
                    if p.poll() not in (None, 0):
                        err.flush()
                        raise WorkerFailed(f"worker {index} exited with {p.returncode}:\n"
                                           + Path(err.name).read_text()[-4000:])
                if time.monotonic() > end:
                    raise WorkerFailed(f"workers still running after {deadline} s:\n" + "\n".join(
                        Path(err.name).read_text()[-2000:] for _, _, err in procs))
                time.sleep(0.2)
            for index, (p, _, err) in enumerate(procs):
                if p.returncode != 0:
                    raise WorkerFailed(f"worker {index} exited with {p.returncode}:\n"
                                       + Path(err.name).read_text()[-4000:])
            return [parse(Path(out.name).read_text()) for _, out, _ in procs]
        finally:
            for p, out, err in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
                out.close()
                err.close()


def parse(stdout):
    (line,) = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(line[len("RESULT "):])


def run_single(args):
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    proc = subprocess.run([sys.executable, str(WORKER), *args], capture_output=True, text=True,
                          env=dict(env, TF_CPP_MIN_LOG_LEVEL="2"), timeout=DEADLINE_SECONDS)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return parse(proc.stdout)


def check_same_training(workers, single):
    assert [w["replicas"] for w in workers] == [2, 2] and single["replicas"] == 1
    assert sorted(w["task"] for w in workers) == [0, 1]
    first, second = workers
    assert first["losses"] == second["losses"]
    assert first["weights"] == second["weights"]  # same all-reduced updates, same bits
    assert single["losses"][-1] < 0.8 * single["losses"][0], single["losses"]  # it trains
    np.testing.assert_allclose(first["losses"], single["losses"], rtol=1e-5)
    assert len(first["weights"]) == len(single["weights"])
    for got, want in zip(first["weights"], single["weights"]):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_tf_keras_fit_on_two_workers_matches_one_process():
    check_same_training(run_workers(["tf_keras_fit"]), run_single(["tf_keras_fit"]))


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "jit"])
def test_keras3_custom_loop_on_two_workers_matches_one_process(jit):
    args = ["keras3_loop"] + (["--jit"] if jit else [])
    check_same_training(run_workers(args), run_single(args))


def test_a_dead_worker_fails_fast_with_its_error_and_leaves_no_process():
    start = time.monotonic()
    with pytest.raises(WorkerFailed, match="worker failed on purpose"):
        run_workers(["die"], deadline=60)
    assert time.monotonic() - start < 60  # not the deadline: the death was seen
