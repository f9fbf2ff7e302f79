"""The built libraries carry GPU code that r525+ drivers load, and no CUDA runtime.

Reads the device code embedded in `_masked_mae_ops.so` and `_core*.so` (raw
CUDA ELF cubins and PTX text, see tools/build_device_code.sh) without a GPU,
and fails if anything in them needs a newer driver than the documented
minimum, CUDA 12.0 / r525 (README, "CUDA runtime"):
- the cubins are exactly sm_60, 61 (Pascal, which TensorFlow 2.21 supports),
  70, 75, 80, 86, 89, 90, each ELF ABI 7 (OSABI 0x33), assembled by a CUDA
  12.x toolkit (cuobjdump: abi=7, toolkit=12x) (CUDA 13 writes ABI 8 for
  these, which needs r580), plus sm_100 and sm_120 assembled by CUDA 12.x's
  ptxas from the PTX: ABI 8 (OSABI 0x41), the only format of sm_100+ cubins,
  on GPUs whose drivers (r570+) are newer than r525 anyway;
- the PTX is exactly one, for sm_90, ISA `.version` <= 8.0 (8.0 = r525);
- no CUDA runtime: no libcudart (or libcuda) in NEEDED, no cudart symbols;
- every cubin has exactly the kernels the launchers look up by name.
Also: the driver floor (too old -> no GPU kernels, one warning, CPU runs).

CI compiles the GPU code on machines without a GPU, so these run there; a
build without the CUDA toolchain skips them, except under CI (CI=true),
where a build without GPU code is a failure.
"""

import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile

import pytest

import fused_masked_mae
from fused_masked_mae import _build_info, _core

PACKAGE_DIR = os.path.dirname(fused_masked_mae.__file__)
OPS_LIBRARY = os.path.join(PACKAGE_DIR, "_masked_mae_ops.so")
LIBRARIES = [OPS_LIBRARY, _core.__file__]
LIBRARY_IDS = ["ops", "core"]
CUBIN_ARCHS = {60, 61, 70, 75, 80, 86, 89, 90, 100, 120}
PTX_ARCHS = {90}
MAX_PTX_ISA = (8, 0)  # PTX ISA 8.0 <-> CUDA 12.0 <-> driver r525
CUDA_ELF_ABI = 7  # CUDA 12 ptxas; CUDA 13 writes ABI 8 (OSABI 0x41), which needs r580
BLACKWELL_SM = 100  # from here on cubins are ABI 8 whatever the toolkit (CUDA 12.8+)


def expected_abi(sm):
    """(OSABI, ABI version) a CUDA 12.x ptxas writes for sm."""
    return (0x41, 8) if sm >= BLACKWELL_SM else (0x33, CUDA_ELF_ABI)
EM_CUDA = 190

if not _build_info.CUDA_ENABLED and os.environ.get("CI"):
    pytest.fail("CI built the package without GPU code: the CUDA toolchain setup in build.sh "
                "failed (see its log)", pytrace=False)
pytestmark = pytest.mark.skipif(
    not _build_info.CUDA_ENABLED, reason="built without the CUDA toolchain: no GPU code to check"
)


# --- Reading the embedded device code --------------------------------------------


def _elf_sections(blob):
    """{name: (type, offset, size, link)} of an ELF64 image."""
    shoff, = struct.unpack_from("<Q", blob, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", blob, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", blob, shoff + i * shentsize) for i in range(shnum)]
    names_offset = headers[shstrndx][4]
    sections = []
    for h in headers:
        start = names_offset + h[0]
        name = blob[start:blob.index(b"\0", start)].decode()
        sections.append((name, h[1], h[4], h[5], h[6]))
    return sections


def _elf_size(blob):
    """Bytes up to the end of the section or program header table, whichever is last."""
    phoff, shoff = struct.unpack_from("<QQ", blob, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", blob, 0x36)
    return max(shoff + shentsize * shnum, phoff + phentsize * phnum)


def _function_symbols(blob):
    sections = _elf_sections(blob)
    names = set()
    for name, kind, offset, size, link in sections:
        if kind != 2:  # SHT_SYMTAB
            continue
        strtab = sections[link][2]
        for k in range(size // 24):
            st_name, st_info = struct.unpack_from("<IB", blob, offset + 24 * k)
            if st_info & 0xF == 2:  # STT_FUNC
                start = strtab + st_name
                names.add(blob[start:blob.index(b"\0", start)].decode())
    return names


def embedded_images(path):
    """(cubins, ptxs): cubins as {sm: ELF bytes}, ptxs as {sm: PTX text}."""
    data = open(path, "rb").read()
    cubins, ptxs = {}, {}
    for m in re.finditer(rb"\x7fELF\x02\x01\x01", data):
        start = m.start()
        e_machine, = struct.unpack_from("<H", data, start + 18)
        if e_machine != EM_CUDA:
            continue
        blob = data[start:start + _elf_size(data[start:start + 64])]
        flags = struct.unpack_from("<I", blob, 48)[0]
        # e_flags: the SM in bits 0-7 for ABI 7, bits 8-15 for ABI 8 (sm_100+).
        sm = (flags >> 8) & 0xFF if blob[8] >= 8 else flags & 0xFF
        assert sm not in cubins, f"two cubins for sm_{sm} in {path}"
        cubins[sm] = blob
    for m in re.finditer(rb"\.version (\d+)\.(\d+)\s*\n\s*\.target (sm_\d+)", data):
        end = data.index(b"\0", m.start())
        sm = int(m.group(3)[3:])
        assert sm not in ptxs, f"two PTX images for sm_{sm} in {path}"
        ptxs[sm] = data[m.start():end].decode()
    return cubins, ptxs


_IMAGES = {}


def images(path):
    if path not in _IMAGES:
        _IMAGES[path] = embedded_images(path)
    return _IMAGES[path]


def cuobjdump():
    # The system CUDA toolkit's, else the one requirements.txt installs from PyPI.
    candidates = [shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"] + [
        os.path.join(p, "nvidia", "cu13", "bin", "cuobjdump") for p in sys.path
    ]
    for path in candidates:
        if path and os.path.exists(path):
            return path
    pytest.fail("cuobjdump not found: install nvidia-cuda-cuobjdump (requirements.txt)")


# --- Machine code and PTX ----------------------------------------------------------


def cubin_problems(cubins):
    """What in {sm: cubin} needs a newer driver than r525, or is not the documented set."""
    problems = []
    if set(cubins) != CUBIN_ARCHS:
        problems.append(f"cubins for {sorted(cubins)}, expected {sorted(CUBIN_ARCHS)}")
    for sm, blob in sorted(cubins.items()):
        osabi, abi_version = blob[7], blob[8]
        if (osabi, abi_version) != expected_abi(sm):
            problems.append(f"sm_{sm}: OSABI {osabi:#x}, ABI version {abi_version}: not a CUDA 12 "
                            "cubin (ABI 8 / OSABI 0x41 is CUDA 13's and needs driver r580+)")
    return problems


def ptx_problems(ptxs):
    problems = []
    if set(ptxs) != PTX_ARCHS:
        problems.append(f"PTX for {sorted(ptxs)}, expected {sorted(PTX_ARCHS)}")
    for sm, text in sorted(ptxs.items()):
        major, minor = map(int, re.search(r"\.version (\d+)\.(\d+)", text).groups())
        if (major, minor) > MAX_PTX_ISA:
            problems.append(f"PTX sm_{sm}: .version {major}.{minor} needs a newer driver than r525")
    return problems


@pytest.mark.parametrize("library", LIBRARIES, ids=LIBRARY_IDS)
def test_cubins_are_abi7_for_exactly_the_documented_archs(library):
    cubins, _ = images(library)
    assert cubin_problems(cubins) == []


def test_the_checks_catch_cuda13_images_and_a_missing_arch():
    cubins, ptxs = images(OPS_LIBRARY)
    cuda13 = dict(cubins)
    cuda13[90] = cubins[90][:7] + bytes([0x41, 8]) + cubins[90][9:]  # what CUDA 13 ptxas writes
    assert any("sm_90: OSABI 0x41, ABI version 8" in p for p in cubin_problems(cuda13))
    assert cubin_problems({sm: b for sm, b in cubins.items() if sm != 70})
    assert cubin_problems({sm: b for sm, b in cubins.items() if sm != 60})  # Pascal
    assert cubin_problems({sm: b for sm, b in cubins.items() if sm != 120})
    assert ptx_problems({90: ptxs[90].replace(".version 8.0", ".version 9.0", 1)})
    assert ptx_problems({**ptxs, 100: ptxs[90]})


@pytest.mark.parametrize("library", LIBRARIES, ids=LIBRARY_IDS)
def test_cuobjdump_reads_cuda12_toolkit_abi7(library, tmp_path):
    cubins, _ = images(library)
    for sm, blob in sorted(cubins.items()):
        path = tmp_path / f"sm_{sm}.cubin"
        path.write_bytes(blob)
        with subprocess.Popen([cuobjdump(), "-elf", str(path)], stdout=subprocess.PIPE,
                              text=True) as proc:
            # ABI 7: "64bit elf: ... abi=7, sm=90, toolkit=129"; ABI 8: "64-bit ELF:
            # ... ABI=8, sm=100, toolkit=12.9".
            header = next((line for line in proc.stdout
                           if "64bit elf" in line or "64-bit ELF" in line), "")
            proc.kill()
        m = re.search(r"abi=(\d+), sm=(\d+), toolkit=(\d+)(?:\.(\d+))?", header, re.IGNORECASE)
        assert m, f"cuobjdump printed no ELF header for sm_{sm}: {header!r}"
        abi, arch = int(m.group(1)), int(m.group(2))
        toolkit = int(m.group(3)) * 10 + int(m.group(4)) if m.group(4) else int(m.group(3))
        print(f"{os.path.basename(library)} sm_{sm}: abi={abi} sm={arch} toolkit={toolkit}")
        assert (abi, arch) == (expected_abi(sm)[1], sm), header
        assert 120 <= toolkit < 130, f"sm_{sm} was assembled by toolkit {toolkit}, not CUDA 12.x"


@pytest.mark.parametrize("library", LIBRARIES, ids=LIBRARY_IDS)
def test_ptx_isa_is_at_most_8_0(library):
    _, ptxs = images(library)
    for sm, text in sorted(ptxs.items()):
        print(f"{os.path.basename(library)} PTX sm_{sm}: "
              f"{re.search(r'[.]version [0-9.]+', text).group(0)}")
    assert ptx_problems(ptxs) == []


@pytest.mark.parametrize("library", LIBRARIES, ids=LIBRARY_IDS)
def test_every_image_has_exactly_the_kernels_the_launchers_look_up(library):
    expected = set(_core.kernel_names())
    cubins, ptxs = images(library)
    for sm, blob in cubins.items():
        found = {n for n in _function_symbols(blob) if n.startswith("fused_masked_mae_")}
        assert found == expected, (sm, sorted(found ^ expected)[:10])
    for sm, text in ptxs.items():
        found = set(re.findall(r"\.entry (fused_masked_mae_\w+)\(", text))
        assert found == expected, (sm, sorted(found ^ expected)[:10])


# --- No CUDA runtime ------------------------------------------------------------------


@pytest.mark.parametrize("library", LIBRARIES, ids=LIBRARY_IDS)
def test_no_cuda_runtime_inside_or_needed(library):
    dynamic = subprocess.run(["readelf", "-d", "-W", library], capture_output=True, text=True,
                             check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic)
    assert needed, dynamic
    assert not [n for n in needed if re.match(r"libcud(art|a)\b", n)], needed
    symbols = subprocess.run(["nm", "-C", library], capture_output=True, text=True).stdout
    symbols += subprocess.run(["nm", "-D", "-C", library], capture_output=True, text=True).stdout
    runtime = sorted(set(re.findall(
        r"\b(__cudaRegister\w*|__cudaPushCallConfiguration|cudaLaunchKernel\w*|cudart\w*|"
        r"cudaGetErrorString|cudaGetLastError)\b", symbols)))
    assert runtime == [], runtime
    # A fat binary is how nvcc + cudart embed device code; this route has none.
    sections = subprocess.run(["readelf", "-S", "-W", library], capture_output=True, text=True,
                              check=True).stdout
    assert ".nv_fatbin" not in sections and "__nv_module_id" not in symbols


# --- Registration and the driver floor --------------------------------------------


def test_gpu_kernels_are_registered_for_every_dtype():
    from tensorflow.python.framework import kernels

    if _core.cuda_driver()[0] == "too_old":
        pytest.skip("this machine's driver is below the minimum: GPU kernels are not registered")
    for op in ("Import_fused_masked_mae>MaskedMae", "Import_fused_masked_mae>MaskedMaeGrad",
               "Import_fused_masked_mae>SparseMaskedMae",
               "Import_fused_masked_mae>SparseMaskedMaeGrad"):
        registered = kernels.get_registered_kernels_for_op(op).kernel
        gpu_types = {
            t for k in registered if k.device_type == "GPU"
            for c in k.constraint if c.name == "T" for t in c.allowed_values.list.type
        }
        # DT_HALF=19, DT_BFLOAT16=14, DT_FLOAT=1, DT_DOUBLE=2
        assert gpu_types == {1, 2, 14, 19}, (op, registered)
        if "Sparse" in op:  # DT_INT32=3, DT_INT64=9 ids
            id_types = {t for k in registered if k.device_type == "GPU"
                        for c in k.constraint if c.name == "Tidx"
                        for t in c.allowed_values.list.type}
            assert id_types == {3, 9}, (op, registered)


def test_core_reports_cuda():
    assert _core.WITH_CUDA is True
    assert _core.MIN_DRIVER_VERSION == 12000


@pytest.mark.parametrize("version, state", [
    (0, "missing"), (-1, "missing"), (11080, "too_old"), (11999, "too_old"),
    (12000, "ok"), (12020, "ok"), (12090, "ok"), (13000, "ok"),
])
def test_driver_floor_classification(version, state):
    assert _core.classify_driver_version(version) == state


def test_too_old_message_says_what_to_upgrade():
    message = _core.driver_too_old_message(11080)
    assert "CUDA 11.8" in message and "11080" in message and "r525" in message


def test_this_machine_without_driver_loads_silently_and_runs_on_cpu():
    state, version, message = _core.cuda_driver()
    if state != "missing":
        pytest.skip(f"this machine has an NVIDIA driver ({version})")
    assert "libcuda.so.1" in message


_FLOOR_SCRIPT = r"""
import numpy as np, tensorflow as tf
import fused_masked_mae as fm
from tensorflow.python.framework import kernels
devices = {k.device_type for k in kernels.get_registered_kernels_for_op(
    "Import_fused_masked_mae>MaskedMae").kernel}
loss = fm.masked_mae(np.eye(4, dtype=np.float32), np.eye(4, dtype=np.float32) * 0.5, 0, 1)
print("DEVICES", sorted(devices), "LOSS", loss.numpy().tolist(), "ON", loss.device)
from fused_masked_mae import xla
print("XLA", sorted(xla.registration_report()))
"""


def _run_floor_script(fake_version):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0")
    env.pop("FUSED_MASKED_MAE_FAKE_CUDA_DRIVER_VERSION", None)
    if fake_version is not None:
        env["FUSED_MASKED_MAE_FAKE_CUDA_DRIVER_VERSION"] = str(fake_version)
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run([sys.executable, "-c", _FLOOR_SCRIPT], capture_output=True,
                              text=True, env=env, cwd=cwd, timeout=300)


def test_driver_below_minimum_registers_no_gpu_kernel_and_warns_once():
    result = _run_floor_script(11080)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DEVICES ['CPU'] LOSS [0.0, 0.0, 0.125, 0.125] ON" in result.stdout, result.stdout
    warnings = [line for line in result.stderr.splitlines()
                if "fused_masked_mae: GPU kernels not registered" in line]
    assert len(warnings) == 1, result.stderr[-3000:]
    assert "CUDA 11.8" in warnings[0] and "r525" in warnings[0]
    assert "XLA ['Host']" in result.stdout  # no CUDA XLA handlers either


def test_without_a_too_old_driver_there_is_no_warning():
    if _core.cuda_driver()[0] == "too_old":
        pytest.skip("this machine's driver is below the minimum")
    result = _run_floor_script(None)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DEVICES ['CPU', 'GPU'] LOSS [0.0, 0.0, 0.125, 0.125]" in result.stdout, result.stdout
    assert "XLA ['CUDA', 'Host']" in result.stdout
    assert "GPU kernels not registered" not in result.stderr


def test_core_without_driver_says_so_before_touching_memory():
    if _core.cuda_driver()[0] != "missing":
        pytest.skip("this machine has an NVIDIA driver")
    # Plausible-looking pointers: nothing may be read through them.
    with pytest.raises(RuntimeError, match=r"no NVIDIA driver \(libcuda.so.1"):
        _core.cuda_forward(16, 16, 16, [2, 3], "float32", [0], 0)
