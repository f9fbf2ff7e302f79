"""The Bazel BUILD file stays in step with build.sh, the build that is used.

Bazel cannot run here (it would fetch rules_cc and friends), so BUILD is
evaluated as Python with stub rules that record their arguments, and compared
with what build.sh's text compiles. Pure file parsing: no TensorFlow, no Bazel.

From build.sh: the C++ sources (literal `cc/...` paths and the variables that
hold them), which compile command builds each one and with which flags, and
which objects each `g++ -shared -o ...` line links. From BUILD: the sources
each cc_binary compiles, with the `:cuda` config_setting off and on (build.sh
without and with the CUDA kernels).
"""

import functools
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).absolute().parent.parent
SRC_RE = re.compile(r"\bcc/[\w./-]+\.cc\b")


def _read(name):
    return (ROOT / name).read_text()


# --- build.sh ---------------------------------------------------------------


def _strip_comments(text):
    # A '#' starts a comment at the start of a line or after blanks; elsewhere it
    # is part of a word, as in "${src#"$ROOT"/}".
    return "\n".join(re.sub(r"(^|\s)#.*", "", line) for line in text.splitlines())


def _words(line):
    # Command substitutions ($(...)) produce flags at run time (pybind11's -I):
    # nothing to compare, and their own arguments are not the command's.
    while True:
        stripped = re.sub(r"\$\([^()]*\)", "", line)
        if stripped == line:
            return shlex.split(line)
        line = stripped


class BuildSh:
    """What build.sh compiles and links, read from its text."""

    def __init__(self, text):
        text = _strip_comments(text)
        self.all_sources = set(SRC_RE.findall(text))
        # Arrays (NAME=(...) / NAME+=(...), possibly over several lines), in order.
        self.arrays = {}
        for m in re.finditer(r"(?<![\w$])(\w+)\+?=\(([^)]*)\)", text):
            self.arrays.setdefault(m.group(1), []).append(shlex.split(m.group(2)))
        # Variables naming sources: OP_LIBRARY_SOURCES=(...), CORE_SOURCE=cc/...
        self.source_vars = {
            name: {w for words in values for w in words if SRC_RE.fullmatch(w)}
            for name, values in self.arrays.items()
        }
        for m in re.finditer(r"^\s*(?:local\s+)?(\w+)=(\S+)\s*$", text, re.M):
            if SRC_RE.fullmatch(m.group(2)):
                self.source_vars[m.group(1)] = {m.group(2)}
        self.source_vars = {k: v for k, v in self.source_vars.items() if v}

        self.compiles = []  # (sources, command words after `compile OUT SRC`)
        self.objects = {}  # object word ("$obj", "$BUILD_DIR/x.o") -> sources
        self.object_arrays = {}  # op_objs -> sources of the objects appended to it
        self.links = {}  # library stem (_core) -> (sources, link words)

        lines = self._logical_lines(text)
        loop = None
        for line in lines:
            m = re.match(r"\s*for (\w+) in (.*?);\s*do\b(.*)$", line)
            if m:
                loop_vars = {m.group(1): self._expand(m.group(2), {})}
                if re.search(r"\bdone\b", m.group(3)):  # one-line loop
                    self._statement(m.group(3), loop_vars)
                else:
                    loop = loop_vars
                continue
            if loop is not None and line.strip() == "done":
                loop = None
                continue
            self._statement(line, loop or {})

    @staticmethod
    def _logical_lines(text):
        lines, pending = [], ""
        for line in text.splitlines():
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
            else:
                lines.append(pending + line)
                pending = ""
        return lines

    def _expand(self, word, loop_vars):
        sources = set(SRC_RE.findall(word))
        for var in re.findall(r"\$\{?(\w+)", word):
            sources |= self.source_vars.get(var, set()) | loop_vars.get(var, set())
        return sources

    def _statement(self, line, loop_vars):
        if line.strip().startswith("compile "):
            words = _words(line)
            obj, src, command = words[1], words[2], words[3:]
            sources = self._expand(src, loop_vars)
            self.compiles.append((sources, command))
            self.objects.setdefault(obj, set()).update(sources)
        for m in re.finditer(r"(?<![\w$])(\w+)\+?=\(([^)]*)\)", line):
            for word in shlex.split(m.group(2)):
                if word in self.objects:
                    self.object_arrays.setdefault(m.group(1), set()).update(self.objects[word])
        if "-shared" in line and " -o " in line:
            words = _words(line)
            output = words[words.index("-o") + 1]
            stem = re.split(r"[.$]", output.rsplit("/", 1)[-1])[0]
            sources = set()
            for word in words:
                array = re.fullmatch(r"\$\{(\w+)\[@\]\}", word)
                if array:
                    sources |= self.object_arrays.get(array.group(1), set())
                sources |= self.objects.get(word, set()) | set(SRC_RE.findall(word))
            self.links[stem] = (sources, words)

    @staticmethod
    def is_device_command(command):
        # nvcc, or the device-code script (clang --cuda-device-only + embedding).
        return bool(re.search(r"nvcc|clang|build_device_code", command[0]))

    def is_device_source(self, source):
        return any(source in s and self.is_device_command(cmd) for s, cmd in self.compiles)

    def array_flags(self, name):
        """(flags, conditional): literal flags of an array; arrays that start out
        empty are only filled with the CUDA toolchain (cuda_defs), i.e. CUDA-only."""
        values = self.arrays.get(name, [])
        flags = [w for words in values for w in words if w.startswith("-") and "$" not in w]
        return flags, bool(values) and values[0] == []

    def host_flags(self, command):
        """(always, cuda_only) flags of a g++ compile command."""
        always, cuda_only = set(), set()
        for word in command[1:]:
            array = re.fullmatch(r"\$\{(\w+)\[@\]\}", word)
            if array:
                flags, conditional = self.array_flags(array.group(1))
                (cuda_only if conditional else always).update(flags)
            elif word.startswith("-") and "$" not in word and word not in ("-c", "-o"):
                always.add(word)
        return always, cuda_only


# --- BUILD --------------------------------------------------------------------

CPU, CUDA = "cpu", "cuda"


class Select:
    """select(): a value per configuration; `+` works as in Starlark."""

    def __init__(self, resolve):
        self.resolve = resolve

    def __add__(self, other):
        return Select(lambda cfg: self.resolve(cfg) + resolved(other, cfg))

    def __radd__(self, other):
        return Select(lambda cfg: resolved(other, cfg) + self.resolve(cfg))


def resolved(value, cfg):
    return value.resolve(cfg) if isinstance(value, Select) else value


class Loaded:
    """A constant loaded from a generated .bzl (TF_CXXOPTS, TF_VERSION)."""

    def __init__(self, label, name):
        self.text = f"<{name} from {label}>"

    def __str__(self):
        return self.text

    def __radd__(self, other):  # a list constant; its contents are machine-specific
        return list(other) if isinstance(other, list) else NotImplemented

    __add__ = __radd__


RULES = (
    "cc_binary cc_library config_setting cuda_library exports_files filegroup genrule "
    "package py_library py_test"
).split()


def _glob1(pattern, build_root):
    # Bazel's "dir/**" means every file below dir; pathlib's means directories.
    if pattern.endswith("**"):
        pattern += "/*"
    found = set()
    for path in build_root.glob(pattern):
        rel = path.relative_to(build_root)
        # Like Bazel, stop at subpackages (directories with a BUILD file).
        in_subpackage = any(
            (build_root / parent / name).exists()
            for parent in rel.parents
            if parent != Path(".")
            for name in ("BUILD", "BUILD.bazel")
        )
        if path.is_file() and not in_subpackage:
            found.add(rel.as_posix())
    return found


def evaluate_build(text, build_root=ROOT):
    """Runs BUILD's text with stub rules; returns {target name: (rule, attrs)}."""
    targets = {}

    def rule(kind):
        def record(**attrs):
            if "name" in attrs:
                assert attrs["name"] not in targets, f"duplicate target {attrs['name']}"
                targets[attrs["name"]] = (kind, attrs)

        return record

    def glob(include, exclude=(), allow_empty=False):
        matches = {pattern: _glob1(pattern, build_root) for pattern in include}
        # Bazel (--incompatible_disallow_empty_glob, the default) fails the
        # package when any pattern matches nothing.
        empty = [pattern for pattern, found in matches.items() if not found]
        assert allow_empty or not empty, f"glob patterns match nothing: {empty}"
        found = set().union(*matches.values())
        return sorted(found - set().union(*(_glob1(p, build_root) for p in exclude)))

    def select(branches):
        def pick(cfg):
            for key, value in branches.items():
                if cfg == CUDA and key.split(":")[-1] == "cuda":
                    return value
            return branches["//conditions:default"]

        return Select(pick)

    def load(label, *names):
        for name in names:
            namespace.setdefault(name, Loaded(label, name))

    namespace = {name: rule(name) for name in RULES}
    namespace.update(glob=glob, select=select, load=load)
    exec(compile(text, "BUILD", "exec"), namespace)
    return targets


def _split(label):
    package, _, name = label.lstrip("/").rpartition(":") if ":" in label else ("", "", label)
    return package, name


def local_target(label, targets):
    """The BUILD target a label names (":x", "x", "//:x"), else None."""
    package, name = _split(label)
    return name if not label.startswith("@") and not package and name in targets else None


def local_path(label, targets):
    """The file a label names, or None for external repositories and rules."""
    if label.startswith("@") or local_target(label, targets):
        return None
    package, name = _split(label)
    return f"{package}/{name}" if package else name


def compiled_sources(targets, name, cfg):
    """The .cc translation units a C++ target builds, its C++ deps included, and
    those of rules generating its sources (the device-code genrule)."""
    kind, attrs = targets[name]
    sources = {}
    for label in resolved(attrs.get("srcs", []), cfg):
        path = local_path(label, targets)
        if path and path.endswith(".cc"):
            sources[path] = name
        elif local_target(label, targets):
            sources.update(compiled_sources(targets, local_target(label, targets), cfg))
    for dep in resolved(attrs.get("deps", []), cfg):
        if local_target(dep, targets):
            sources.update(compiled_sources(targets, local_target(dep, targets), cfg))
    return sources


def library_target(targets, stem):
    matches = [
        name
        for name, (kind, attrs) in targets.items()
        if kind == "cc_binary" and re.split(r"[.$]", name.rsplit("/", 1)[-1])[0] == stem
    ]
    assert len(matches) == 1, f"BUILD needs one cc_binary for build.sh's {stem}: {matches}"
    return matches[0]


# --- The comparisons (functions of the two texts, so they can be shown to fail) --


def source_mismatches(build_sh_text, build_text):
    sh, targets = BuildSh(build_sh_text), evaluate_build(build_text)
    problems = []
    if not sh.links.get("_masked_mae_ops", ((), ()))[0]:
        problems.append("build.sh: no sources found for _masked_mae_ops.so; update BuildSh")
    built = set()
    for stem, (sources, _) in sorted(sh.links.items()):
        name = library_target(targets, stem)
        for cfg in (CPU, CUDA):
            want = {s for s in sources if cfg == CUDA or not sh.is_device_source(s)}
            got = set(compiled_sources(targets, name, cfg))
            built |= got
            if got != want:
                problems.append(
                    f"{name} ({cfg}): BUILD compiles {sorted(got)}, build.sh {sorted(want)}"
                )
    if built != sh.all_sources:
        problems.append(
            f"sources in build.sh {sorted(sh.all_sources)} != built by BUILD {sorted(built)}"
        )
    return problems


def flag_mismatches(build_sh_text, build_text):
    sh, targets = BuildSh(build_sh_text), evaluate_build(build_text)
    problems = []
    for stem, (sources, link_words) in sorted(sh.links.items()):
        name = library_target(targets, stem)
        for cfg in (CPU, CUDA):
            owners = compiled_sources(targets, name, cfg)
            for compile_sources, command in sh.compiles:
                if sh.is_device_command(command):
                    continue  # the device-code script's own command line; see BUILD
                always, cuda_only = sh.host_flags(command)
                want = always | (cuda_only if cfg == CUDA else set())
                for source in sorted(compile_sources & set(owners)):
                    copts = set(resolved(targets[owners[source]][1].get("copts", []), cfg))
                    if want - copts:
                        problems.append(f"{source} ({cfg}): copts lack {sorted(want - copts)}")
        linkopts = set(resolved(targets[name][1].get("linkopts", []), CPU))
        missing = {w for w in link_words if w.startswith("-Wl,")} - linkopts
        if missing:
            problems.append(f"{name}: linkopts lack {sorted(missing)}")
    return problems


@functools.lru_cache(maxsize=None)
def _targets():
    return evaluate_build(_read("BUILD"))


# --- Tests ------------------------------------------------------------------


def test_build_sh_parses():
    sh = BuildSh(_read("build.sh"))
    assert {"_masked_mae_ops", "_core"} <= set(sh.links), sh.links
    assert sh.links["_masked_mae_ops"][0], "no op-library sources found in build.sh"


def test_libraries_compile_the_sources_build_sh_compiles():
    assert source_mismatches(_read("build.sh"), _read("BUILD")) == []


def test_host_copts_and_link_flags_include_build_sh_flags():
    assert flag_mismatches(_read("build.sh"), _read("BUILD")) == []


def test_files_named_in_build_exist():
    targets = _targets()
    missing = []
    for name, (kind, attrs) in targets.items():
        for attr in ("srcs", "hdrs", "data", "main"):
            value = attrs.get(attr, [])
            for cfg in (CPU, CUDA):
                labels = resolved(value, cfg)
                for label in [labels] if isinstance(labels, str) else labels:
                    path = local_path(label, targets)
                    if path and not (ROOT / path).is_file():
                        missing.append(f"{name}.{attr}: {label}")
        for arg in attrs.get("args", []):
            for label in re.findall(r"\$\(location ([^)]+)\)", arg):
                if not (ROOT / local_path(label, targets)).is_file():
                    missing.append(f"{name}.args: {label}")
    assert missing == []


def test_every_test_file_has_a_py_test_running_it():
    targets = _targets()
    covered, helpers = {}, set()
    for name, (kind, attrs) in targets.items():
        if kind == "py_test":
            assert attrs["main"] in attrs["srcs"], name
            for src in attrs["srcs"]:
                if f"$(location {src})" in attrs.get("args", []):
                    covered[src] = name
            for dep in attrs.get("deps", []):
                if local_target(dep, targets):
                    helpers.update(targets[local_target(dep, targets)][1].get("srcs", []))
    tests = ROOT / "tests"
    on_disk = {p.relative_to(ROOT).as_posix() for p in tests.glob("test_*.py")}
    assert on_disk - set(covered) == set()
    assert "tests/test_bazel_build.py" in covered
    # Modules the tests import (numpy_reference.py, conftest.py) come along.
    others = {p.relative_to(ROOT).as_posix() for p in tests.glob("*.py")} - on_disk
    assert others - helpers == set()


def test_python_package_is_covered():
    targets = _targets()
    kind, attrs = targets["fused_masked_mae"]
    assert kind == "py_library" and attrs["imports"] == ["python"]
    generated = {
        out: name for name, (k, a) in targets.items() if k == "genrule" for out in a["outs"]
    }
    srcs = set()
    for label in attrs["srcs"]:
        rule = local_target(label, targets)
        srcs.update(targets[rule][1]["outs"] if rule else [label])
    package = ROOT / "python" / "fused_masked_mae"
    on_disk = {
        p.relative_to(ROOT).as_posix()
        for p in package.rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert on_disk - set(generated) - srcs == set()
    assert "python/fused_masked_mae/_build_info.py" in srcs & set(generated)
    libraries = {n for n, (k, _) in targets.items() if k == "cc_binary"}
    assert {local_target(label, targets) for label in attrs["data"]} == libraries


def test_build_info_has_the_fields_build_sh_writes():
    text = _read("build.sh")
    body = re.search(r'_build_info\.py"?\s*<<-?\'?(\w+)\'?\n(.*?)\n\1\n', text, re.S)
    fields = re.findall(r"^(\w+) =", body.group(2), re.M)
    assert fields, "no _build_info.py heredoc found in build.sh"
    cmd = _targets()["build_info"][1]["cmd"]
    for cfg, cuda_enabled in ((CPU, "False"), (CUDA, "True")):
        written = resolved(cmd, cfg)
        assert all(f"{field} = " in written for field in fields), (cfg, written)
        assert f"CUDA_ENABLED = {cuda_enabled}" in written


def test_external_repositories_are_declared():
    module, build = _read("MODULE.bazel"), _read("BUILD")
    visible = set(re.findall(r'bazel_dep\(name = "(\w+)"', module))
    for names in re.findall(r"use_repo\(\w+, ([^)]*)\)", module):
        visible.update(re.findall(r'"(\w+)"', names))
    assert set(re.findall(r'"@(\w+)//', build)) - visible == set()
    # What BUILD takes from @local_config_tf is what tf_configure.bzl generates.
    configure = _read("bazel/tf_configure.bzl")
    for target in re.findall(r'"@local_config_tf//:([\w.]+)"', build):
        assert f'name = "{target}"' in configure or f'rctx.file("{target}"' in configure
    for names in re.findall(r'load\("@local_config_tf//:[\w.]+", (.*)\)', build):
        for name in re.findall(r'"(\w+)"', names):
            assert f'"{name} = ' in configure, name


def test_a_source_added_to_build_sh_only_is_reported():
    build_sh = _read("build.sh")
    sh = BuildSh(build_sh)
    host = [s for s in sh.links["_masked_mae_ops"][0] if not sh.is_device_source(s)]
    first = min(host, key=build_sh.index)  # where the host sources are listed
    changed = build_sh.replace(first, f"cc/tf/extra_ops.cc {first}", 1)
    problems = source_mismatches(changed, _read("BUILD"))
    assert any("cc/tf/extra_ops.cc" in p for p in problems), problems


def test_a_source_or_flag_dropped_from_build_is_reported():
    build = _read("BUILD")
    without_ops = build.replace('"cc/tf/masked_mae_ops.cc",', "", 1)
    assert without_ops != build
    assert source_mismatches(_read("build.sh"), without_ops)
    without_ndebug = build.replace('"-DNDEBUG",', "", 1)
    assert without_ndebug != build
    assert any("-DNDEBUG" in p for p in flag_mismatches(_read("build.sh"), without_ndebug))
