"""A TensorFlow-free install: `import fused_masked_mae` imports no framework,
JAX alone or PyTorch alone runs the loss (simulated here by making the other
frameworks unimportable in a fresh process), the wheel requires only NumPy
with one extra per framework, and the XLA handler library links no framework."""

import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

import fused_masked_mae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# "Not installed": importing a blocked framework raises ModuleNotFoundError,
# and importlib.util.find_spec reports it missing.
BLOCKER = textwrap.dedent("""
    import importlib.abc, importlib.util, sys
    BLOCKED = {blocked!r}
    class Blocker(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in BLOCKED:
                return importlib.util.spec_from_loader(name, self)
        def create_module(self, spec):
            raise ModuleNotFoundError(f"No module named {{spec.name!r}} (blocked by the test)",
                                      name=spec.name)
        def exec_module(self, module):
            pass
    sys.meta_path.insert(0, Blocker())
    _find_spec = importlib.util.find_spec
    def find_spec(name, package=None):
        if name.split(".")[0] in BLOCKED:
            return None
        return _find_spec(name, package)
    importlib.util.find_spec = find_spec
""")


def run(code, blocked=()):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run([sys.executable, "-c", BLOCKER.format(blocked=set(blocked)) + code],
                          env=env, capture_output=True, text=True, timeout=600, cwd="/")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def test_importing_the_package_imports_no_framework():
    out = run(textwrap.dedent("""
        import sys
        import fused_masked_mae as fm
        print(sorted(m for m in ("tensorflow", "keras", "jax", "torch", "tf_keras")
                     if m in sys.modules), fm.cpu_isa() in ("baseline", "avx2", "avx512"))
    """))
    assert out.split("\n")[0] == "[] True"


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
def test_jax_alone_runs_the_loss():
    out = run(textwrap.dedent("""
        import numpy as np, jax, jax.numpy as jnp
        import fused_masked_mae as fm
        from fused_masked_mae import jax as fmj
        y = jnp.asarray(np.eye(4, dtype=np.float32)[[0, 1, 2]])
        p = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4)), jnp.float32)
        loss, grad = jax.value_and_grad(lambda q: fmj.masked_mae(y, q, 0, 1).sum())(p)
        print(float(loss) > 0, grad.shape)
        try:
            fm.masked_mae
        except ImportError as error:
            print("ImportError", "tensorflow" in str(error))
    """), blocked=("tensorflow", "torch", "keras", "tf_keras"))
    assert out.split("\n")[:2] == ["True (3, 4)", "ImportError True"]


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_torch_alone_runs_the_loss():
    out = run(textwrap.dedent("""
        import torch
        import fused_masked_mae as fm
        from fused_masked_mae import torch as fmt
        y = torch.eye(4)[[0, 1, 2]]
        p = torch.randn(3, 4, requires_grad=True)
        fmt.masked_mae(y, p, 0, 1).sum().backward()
        print(p.grad.shape == p.shape)
    """), blocked=("tensorflow", "jax", "jaxlib", "keras", "tf_keras"))
    assert out.split("\n")[0] == "True"


def test_loading_tensorflow_after_the_package_loads_the_op_library():
    pytest.importorskip("tensorflow")
    out = run(textwrap.dedent("""
        import sys
        import fused_masked_mae
        from fused_masked_mae import jax as fmj   # the handler library, loaded before TF
        import tensorflow as tf
        print("fused_masked_mae.ops" in sys.modules, "fused_masked_mae.losses" in sys.modules)
        from fused_masked_mae import xla
        print(sorted(xla.REGISTERED_PLATFORMS))
        f = tf.function(lambda a, b: fused_masked_mae.masked_mae(a, b, 0, 1), jit_compile=True)
        print(f(tf.eye(3), tf.eye(3)).numpy().tolist())
    """)) if importlib.util.find_spec("jax") else pytest.skip("jax is not installed")
    lines = out.split("\n")
    assert lines[0] == "True True"
    assert "Host" in lines[1]
    assert lines[2] == "[0.0, 0.0, 0.0]"


def test_handler_library_links_no_framework():
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf is not installed")
    path = os.path.join(os.path.dirname(fused_masked_mae.__file__), "_xla_ffi.so")
    dynamic = subprocess.run([readelf, "-d", path], capture_output=True, text=True).stdout
    needed = set(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic))
    assert needed and needed <= {"libc.so.6", "libstdc++.so.6", "libm.so.6", "libgcc_s.so.1",
                                 "libdl.so.2", "ld-linux-x86-64.so.2"}, needed


def test_wheel_requires_only_numpy_with_an_extra_per_framework():
    wheels = glob.glob(os.path.join(ROOT, "dist", "fused_masked_mae-*.whl"))
    if not wheels:
        pytest.skip("no wheel in dist/ (run ./build.sh)")
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = wheel.namelist()
        metadata = wheel.read(next(n for n in names if n.endswith("METADATA"))).decode()
    requires = re.findall(r"^Requires-Dist: (.*)$", metadata, re.M)
    plain = [r for r in requires if "extra ==" not in r]
    assert plain == ["numpy"], requires
    extras = set(re.findall(r"^Provides-Extra: (\w+)$", metadata, re.M))
    assert {"tensorflow", "jax", "torch", "keras"} <= extras
    assert any(r.startswith("tensorflow<2.22,>=2.21") or r.startswith("tensorflow>=2.21,<2.22")
               for r in requires), requires
    for library in ("_masked_mae_ops.so", "_xla_ffi.so"):
        assert f"fused_masked_mae/{library}" in names
