"""The C++ sources keep the three floors of the README's architecture: front
doors (cc/tf, cc/xla, cc/core) include engines (cc/cpu, cc/cuda) and the math
(cc/math); engines include the math; nothing includes a floor above its own,
and front doors do not include each other. A change that makes the math or an
engine depend on a framework fails here."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
FLOOR = {"tf": 2, "xla": 2, "core": 2, "cpu": 1, "cuda": 1, "math": 0}
INCLUDE = re.compile(r'^\s*#\s*include\s+"cc/([a-z0-9_]+)/[^"]+"', re.MULTILINE)


def project_includes():
    for path in sorted((ROOT / "cc").rglob("*")):
        if path.suffix in (".h", ".cc"):
            folder = path.relative_to(ROOT / "cc").parts[0]
            for included in INCLUDE.findall(path.read_text()):
                yield path.relative_to(ROOT), folder, included


def test_every_source_lives_on_a_known_floor():
    folders = {p.relative_to(ROOT / "cc").parts[0] for p in (ROOT / "cc").rglob("*.*")}
    assert folders == set(FLOOR), folders


def test_includes_point_down_or_sideways_within_a_floor():
    edges = list(project_includes())
    assert len(edges) > 20  # the scan sees the includes at all
    upward = [(str(p), f, i) for p, f, i in edges if FLOOR[i] > FLOOR[f]]
    assert not upward, upward
    between_front_doors = [(str(p), f, i) for p, f, i in edges
                           if FLOOR[f] == 2 and FLOOR[i] == 2 and f != i]
    assert not between_front_doors, between_front_doors


def test_the_math_includes_no_framework():
    for path in (ROOT / "cc" / "math").iterdir():
        includes = re.findall(r'^\s*#\s*include\s+[<"]([^>"]+)[>"]', path.read_text(), re.MULTILINE)
        assert includes, path.name
        for framework in ("tensorflow/", "xla/", "pybind11", "Python.h", "torch", "Eigen", "absl/"):
            assert not any(i.startswith(framework) for i in includes), (path.name, includes)
