"""The shape of the house: one guard that the test matrix covers every registered architecture and backend,
no architecture named outside its own module, an import graph with no circle and nothing running back up,
every architecture module satisfying the protocol, and the parity matrix through the public `perch.check`."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import perch
from perch.archs import ARCH_MODULES, Architecture, arch_module
from perch.dev.presets import PRESETS
from perch.exporter.export import BACKENDS
from perch.exporter.options import OPTIONS
from tests.matrix import ARCHS, BACKENDS as MATRIX_BACKENDS, EXTENDED

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"perch": ROOT / "perch", "perch.exporter": ROOT / "exporter", "perch.runtimes": ROOT / "runtimes",
            "perch.validate": ROOT / "validate"}
# Layers, bottom up: a module may import its own layer and those below, never above.
LAYERS = [
    ("perch.errors", "perch.spec", "perch.manifest_paths", "perch.staging", "perch.progress"),
    ("perch.archs",),
    ("perch.loading", "perch.dev"),
    ("perch.runtimes",),
    ("perch.exporter", "perch.validate"),
    ("perch.cli",),
]
# Artifact runtimes run a model from its files: they may import the core only (and each other).
ARTIFACT_RUNTIMES = ("perch.runtimes.base", "perch.runtimes.onnxrt", "perch.runtimes.coreml", "perch.runtimes.mil",
                     "perch.runtimes.generate")


def modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if pkg == "perch" and parts and parts[0] in ("exporter", "runtimes", "validate"):
                continue
            out[name] = path
    return out


def perch_imports(path: Path) -> set[str]:
    """Every perch module a file imports, at any depth (lazy imports inside functions count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m == "perch" or m.startswith("perch.")}


def layer_of(module: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_house.py: place it")


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: {i for i in perch_imports(p) if i in mods and i != m} for m, p in mods.items()}


# ---------------------------------------------------------------- coverage guard
def test_matrix_covers_every_architecture_and_backend():
    assert set(ARCHS) == set(ARCH_MODULES), "add a row to tests/matrix.py ARCHS for each registered architecture"
    assert set(MATRIX_BACKENDS) == set(BACKENDS) == set(OPTIONS), "add a row to tests/matrix.py BACKENDS"
    for arch, row in ARCHS.items():
        assert all(PRESETS[p].arch == arch for p in row["presets"]), arch


@pytest.mark.parametrize("arch", sorted(ARCH_MODULES))
def test_architecture_modules_satisfy_the_protocol(arch):
    mod = arch_module(arch)
    assert isinstance(mod, Architecture), [n for n in Architecture.__protocol_attrs__ if not hasattr(mod, n)]
    assert mod.NAME == arch and set(mod.FRONTENDS) >= {"past_present", "stateful"}
    assert set(mod.STATE_HOLDS) and all(mod.STATE_HOLDS.values())


# ---------------------------------------------------------------- no architecture named outside its module
ARCH_TEST = re.compile(r"""(==|!=|\bin)\s*\(?\s*["'](%s)["']""" % "|".join(ARCH_MODULES))


def test_no_architecture_is_tested_outside_its_module():
    offenders = []
    for name, path in modules().items():
        if name.startswith("perch.archs"):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if ARCH_TEST.search(line) or re.search(r"\barch\s*==", line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "architecture-specific branches outside perch/archs:\n" + "\n".join(offenders)


# ---------------------------------------------------------------- import graph
def test_import_graph_has_no_circle():
    g = graph()
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in g[m]:
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in g:
        if m not in state:
            visit(m, [m])


def test_no_import_runs_back_up_the_layers():
    ups = [f"{m} -> {n}" for m, deps in graph().items() if m != "perch" for n in deps
           if n != "perch" and layer_of(n) > layer_of(m)]
    assert not ups, "imports that run back up:\n" + "\n".join(ups)


def test_artifact_runtimes_import_only_the_core():
    core = ("perch.errors", "perch.spec", "perch.runtimes")
    bad = [f"{m} -> {n}" for m, deps in graph().items() if m.startswith(ARTIFACT_RUNTIMES) for n in deps
           if not n.startswith(core) or n.startswith("perch.runtimes.pytorch")]
    assert not bad, "\n".join(bad)


def test_the_face():
    for name in ("export", "check", "open_artifact", "load_checkpoint", "ExportOptions", "OnnxOptions",
                 "CoreMLOptions"):
        assert callable(getattr(perch, name)), name


# ---------------------------------------------------------------- one parity test through the public check
ROWS = [pytest.param(row["presets"][0], backend, precision,
                     marks=[pytest.mark.extended] if (arch, precision) in EXTENDED else [])
        for arch, row in ARCHS.items() for backend, precisions in MATRIX_BACKENDS.items() for precision in precisions]


@pytest.mark.parametrize("preset,backend,precision", ROWS)
def test_export_then_check_passes(preset, backend, precision, tmp_path, load_preset):
    quantize = "none" if precision in ("fp32", "fp16") else precision
    options = perch.options_for(backend, precision=precision if quantize == "none" else "fp32",
                                quantize=quantize, max_context=64)
    manifest = perch.export(load_preset(preset), tmp_path / "a", options)
    assert {b.role for b in manifest.bindings} >= {"input", "output"}
    report = perch.check(tmp_path / "a", max_new_tokens=4, quiet=True)
    assert report.passed, report.summary()
