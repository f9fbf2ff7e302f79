"""build.sh rebuilds the device code when what it is built from changes besides
its sources: tools/device_code_stamp.sh's stamp must change with the compilers'
versions and with requirements-cuda.txt, and only with them."""

import os
import pathlib
import stat
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent
STAMP = ROOT / "tools" / "device_code_stamp.sh"


def tool(tmp_path, name, version):
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\necho '{name} version {version}'\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def stamp(clang, ptxas, requirements, **env):
    return subprocess.run([str(STAMP), str(clang), str(ptxas), str(requirements)],
                          capture_output=True, text=True, check=True,
                          env=dict(os.environ, **env)).stdout.strip()


def test_stamp_follows_compilers_wheels_and_archs(tmp_path):
    requirements = tmp_path / "requirements-cuda.txt"
    requirements.write_text((ROOT / "requirements-cuda.txt").read_text())
    clang19, clang20 = tool(tmp_path, "clang19", "19.1.7"), tool(tmp_path, "clang20", "20.1.0")
    ptxas129, ptxas128 = tool(tmp_path, "ptxas129", "12.9"), tool(tmp_path, "ptxas128", "12.8")
    base = stamp(clang19, ptxas129, requirements)
    assert len(base) == 64 and stamp(clang19, ptxas129, requirements) == base
    assert stamp(clang20, ptxas129, requirements) != base
    assert stamp(clang19, ptxas128, requirements) != base
    assert stamp(clang19, ptxas129, requirements, CUDA_ARCHS="70 80") != base
    requirements.write_text(requirements.read_text().replace("12.9.86", "12.9.41"))
    assert stamp(clang19, ptxas129, requirements) != base


def test_build_sh_uses_the_stamp_for_the_device_code():
    text = (ROOT / "build.sh").read_text()
    assert "tools/device_code_stamp.sh" in text and "masked_mae_device_code.stamp" in text
