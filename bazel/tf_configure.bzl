"""`local_config_tf`: the pip-installed TensorFlow as Bazel targets.

The tensorflow/custom-op and tensorflow/compression pattern: a custom op must be
compiled against the exact TensorFlow wheel it will be loaded into (ABI flags,
C++ standard, headers), so instead of fetching TensorFlow this repository rule
runs the Python that has it installed and asks tf.sysconfig. The repository it
creates holds symlinks into that installation and defines

  @local_config_tf//:tf_header_lib            TensorFlow headers; carries the -D ABI
                                              flags of get_compile_flags() as defines
  @local_config_tf//:libtensorflow_framework  the framework library to link against
  @local_config_tf//:libtensorflow_cc         libtensorflow_cc.so.2 (XLA's FFI API)
  @local_config_tf//:pybind11_headers         pybind11 + Python headers (for _core),
                                              like build.sh's `python -m pybind11 --includes`
  @local_config_tf//:tf_config.bzl            TF_CXXOPTS (the other compile flags,
                                              e.g. --std=c++17) and TF_VERSION

Python: $PYTHON_BIN_PATH, else build.sh's <repo>/.venv/bin/python, else python3
on PATH. After changing the installation: `bazel fetch --configure --force`.
"""

# One interpreter start (importing TensorFlow takes seconds); the JSON is the
# last stdout line so that anything TensorFlow prints before it is ignored.
_PROBE = """
import json, os, sys, sysconfig
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import tensorflow as tf
import pybind11
print(json.dumps({
    "compile_flags": tf.sysconfig.get_compile_flags(),
    "link_flags": tf.sysconfig.get_link_flags(),
    "version": tf.__version__,
    "pybind11_include": pybind11.get_include(),
    "python_include": sysconfig.get_paths()["include"],
}))
"""

_BUILD = """\
load("@rules_cc//cc:defs.bzl", "cc_library")

package(default_visibility = ["//visibility:public"])

# Everything under include/ (Eigen's headers have no extension) except the
# sources, data and licences that the wheel also ships there.
cc_library(
    name = "tf_header_lib",
    hdrs = glob(
        ["include/**"],
        exclude = [
            "include/**/*.bin",
            "include/**/*.c",
            "include/**/*.cc",
            "include/**/*.in",
            "include/**/*.td",
            "include/**/*.txt",
            "include/**/*.TXT",
            "include/**/LICENSE*",
        ],
    ),
    defines = {defines},
    includes = ["include"],
)

cc_library(
    name = "libtensorflow_framework",
    srcs = ["{library}"],
)

# The XLA FFI API accessor (xla::ffi::GetXlaFfiApi) lives here.
cc_library(
    name = "libtensorflow_cc",
    srcs = ["libtensorflow_cc.so.2"],
)

cc_library(
    name = "pybind11_headers",
    hdrs = glob([
        "pybind11_include/**/*.h",
        "python_include/**/*.h",
    ]),
    includes = [
        "pybind11_include",
        "python_include",
    ],
)
"""

def _python(rctx):
    explicit = rctx.getenv("PYTHON_BIN_PATH")
    if explicit:
        return explicit
    root = rctx.path(Label("//:MODULE.bazel")).dirname
    venv_python = root.get_child(".venv").get_child("bin").get_child("python")
    if venv_python.exists:
        return str(venv_python)
    found = rctx.which("python3")
    if not found:
        fail("local_config_tf: no python3; set PYTHON_BIN_PATH to a Python with TensorFlow")
    return str(found)

def _tf_configure_impl(rctx):
    python = _python(rctx)
    result = rctx.execute([python, "-c", _PROBE])
    if result.return_code != 0:
        fail("local_config_tf: %s could not import tensorflow and pybind11 " % python +
             "(pip install -r requirements.txt, or run ./build.sh once):\n" + result.stderr)
    info = json.decode(result.stdout.strip().splitlines()[-1])

    # -I<headers> becomes the `include` symlink, -D flags become defines (they
    # must reach every translation unit that sees TensorFlow headers), the rest
    # (--std=c++17) goes to tf_config.bzl for the BUILD file's copts.
    include_dir = None
    defines = []
    cxxopts = []
    for flag in info["compile_flags"]:
        if flag.startswith("-I"):
            include_dir = flag[2:]
        elif flag.startswith("-D"):
            defines.append(flag[2:])
        else:
            cxxopts.append(flag)

    # -L<dir> -l:libtensorflow_framework.so.2: link the file under its real
    # name, so the DT_NEEDED entry matches the wheel's soname.
    lib_dir = None
    library = None
    for flag in info["link_flags"]:
        if flag.startswith("-L"):
            lib_dir = flag[2:]
        elif flag.startswith("-l:"):
            library = flag[3:]
        elif flag.startswith("-l"):
            library = "lib%s.so" % flag[2:]
    if not include_dir or not lib_dir or not library:
        fail("local_config_tf: unexpected tf.sysconfig flags: %s %s" %
             (info["compile_flags"], info["link_flags"]))

    rctx.symlink(include_dir, "include")
    rctx.symlink(lib_dir + "/" + library, library)
    rctx.symlink(lib_dir + "/libtensorflow_cc.so.2", "libtensorflow_cc.so.2")
    rctx.symlink(info["pybind11_include"], "pybind11_include")
    rctx.symlink(info["python_include"], "python_include")
    rctx.file("BUILD.bazel", _BUILD.format(defines = repr(defines), library = library))
    rctx.file("tf_config.bzl", "\n".join([
        '"""Generated by //bazel:tf_configure.bzl from %s."""' % python,
        "TF_CXXOPTS = %s" % repr(cxxopts),
        "TF_VERSION = %s" % repr(info["version"]),
        "",
    ]))

tf_configure_repo = repository_rule(
    implementation = _tf_configure_impl,
    configure = True,
    local = True,
)

def _tf_configure_ext_impl(_mctx):
    tf_configure_repo(name = "local_config_tf")

tf_configure = module_extension(implementation = _tf_configure_ext_impl)
