"""tools/gpu_check.sh keeps one overall deadline, rewrites its JSON report after
every step, and records a step that ran out of time as timed_out (not failed,
not passed). Run here without a GPU: nvidia-smi is absent or finds none (the
gpu step fails), and a stand-in Python makes the test step hang."""

import json
import os
import pathlib
import stat
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_check.sh"


def hanging_python(tmp_path):
    """A python that hangs in `-m pytest`, finds a CUDA core at once (the
    import would cost seconds of the deadline) and is the real one otherwise."""
    path = tmp_path / "python"
    path.write_text(f"""#!/usr/bin/env bash
if [[ "$1" == -m && "$2" == pytest ]]; then sleep 600; fi
if [[ "$1" == -c && "$2" == *"import _core"* ]]; then echo "stand-in _core (ok, 12090)"; exit 0; fi
exec {sys.executable} "$@"
""")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_deadline_timeout_status_and_a_report_after_every_step(tmp_path):
    report = tmp_path / "report.json"
    deadline = 30
    env = dict(os.environ, PYTHON=str(hanging_python(tmp_path)), GPU_CHECK_DEADLINE=str(deadline),
               PATH="/usr/bin:/bin")
    env.pop("OUT", None)
    start = time.monotonic()
    proc = subprocess.Popen(["bash", str(SCRIPT), "--report", str(report)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # While the test step hangs, the report already holds the steps before it.
    partial = None
    while proc.poll() is None and time.monotonic() - start < deadline:
        if report.exists():
            data = json.loads(report.read_text())
            if [s["step"] for s in data["steps"]] == ["gpu", "core"]:
                partial = data
                break
        time.sleep(0.2)
    out, _ = proc.communicate(timeout=deadline + 60)
    elapsed = time.monotonic() - start
    assert partial is not None, out
    assert partial["finished"] is False
    data = json.loads(report.read_text())
    status = {s["step"]: s["status"] for s in data["steps"]}
    assert data["finished"] is True, out
    assert status["tests"] == "timed_out", (status, out)
    assert all(status[t] == "skipped" for t in ("memcheck", "racecheck", "synccheck", "initcheck")), status
    assert data["passed"] is False and proc.returncode != 0
    assert elapsed < deadline + 10, (elapsed, out)


def test_a_deadline_of_540_seconds_or_more_is_refused(tmp_path):
    env = dict(os.environ, GPU_CHECK_DEADLINE="540", PYTHON=sys.executable)
    result = subprocess.run(["bash", str(SCRIPT), "--report", str(tmp_path / "r.json")], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "below 540" in result.stderr
