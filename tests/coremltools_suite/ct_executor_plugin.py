"""pytest plugin: coremltools' own torch-frontend tests, with Perch's MIL executor in Core ML's place.

coremltools ships its test suites in the wheel. On macOS each test converts a torch module and compares
`MLModel.predict` with torch; elsewhere the comparison is skipped (`_IS_MACOS` is False and
`_macos_version()` is ()). This plugin makes those tests take their macOS path on Linux:

- `_macos_version()` reports macOS 15 (the iOS18 runtime, the newest opset our executor implements), and
  the test helpers' `_IS_MACOS` flags are set, so `convert_and_compare` / `compare_backend` predict;
- `MLModel.predict` / `MLModel.make_state` run the converted `.mlpackage` with the real `MilExecutor`,
  converting features as Core ML's runtime does (scalars to shape (1,), numeric types to the declared
  one, PIL images to and from (1, C, H, W) pixel arrays).

Nothing in coremltools' sources is changed: only these entry points are replaced, in this process.
A program holding an op the executor does not implement is skipped with "unsupported op: X", never
passed. Each failure is classified from its traceback (see `_category`): "conversion" (raised inside
`ct.convert`, i.e. coremltools itself), "executor" (raised by the executor, this adapter or coremltools'
comparison of a prediction), or "test" (anything else: torch tracing, the test's own assertions). `--perch-ct-report PATH` writes every
selected test's outcome and category as JSON; `--perch-ct-selection FILE` picks the tests (see
selection.txt for the format).
"""
from __future__ import annotations

import fnmatch
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# Read by coremltools.converters.mil.testing_reqs at import: ML programs only (the executor runs no
# neural networks), and the fp32 variants next to the default fp16 ones.
os.environ.setdefault("PYMIL_TEST_TARGETS", "mlprogram")
os.environ.setdefault("INCLUDE_MIL_FP32_UNIT_TESTS", "1")

_MACOS = (15, 0)
_state: dict[str, Any] = {"predicted": False}
_results: dict[str, dict[str, Any]] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("perch-ct", "coremltools' tests against Perch's MIL executor")
    group.addoption("--perch-ct-selection", help="file of test-id patterns to run (default: all collected)")
    group.addoption("--perch-ct-report", help="write each selected test's outcome and category here (JSON)")
    group.addoption("--perch-ct-shard", default="0/1", help="I/N: run every N-th selected test from the I-th")
    group.addoption("--perch-ct-log", help="append each test's entry to this file as it ends (JSON lines)")


# ---- the stand-ins -------------------------------------------------------------------------------


def _executor(mlmodel: Any) -> Any:
    """The executor for this MLModel's package, built once; unsupported ops skip the test."""
    ex = mlmodel.__dict__.get("_perch_executor")
    if ex is None:
        from perch.errors import PerchError
        from perch.runtimes.mil.executor import MilExecutor, MilProgram, program_op_types, unsupported_ops

        if mlmodel.package_path is None:
            pytest.skip("not an ML program (a neural network model): Perch runs only ML programs")
        program = MilProgram.load(mlmodel.package_path)
        name = mlmodel.function_name or program.default_function
        missing = unsupported_ops(program_op_types(program.function(name)))
        if missing:
            pytest.skip("unsupported op: " + ", ".join(missing))
        try:
            ex = MilExecutor(program, name)
        except PerchError as e:  # what MLModel raises for a model Core ML will not compile or load
            raise RuntimeError(f"Core ML would not load this model: {e}") from e
        mlmodel.__dict__["_perch_executor"] = ex
    return ex


def _as_declared(value: Any, tensor: Any) -> np.ndarray:
    """What Core ML's feature conversion does before predicting: a scalar becomes shape (1,), and a
    multiarray of another numeric type is converted to the declared one (floats to int32 truncate)."""
    a = np.asarray(value)
    if a.ndim == 0:
        a = a.reshape(1)
    return a.astype(tensor.dtype, copy=False)


def _image_kinds(features: Any) -> dict[str, str]:
    """Feature name -> color space ("RGB", "BGR", "GRAYSCALE", ...) for the image-typed ones."""
    from coremltools.proto import FeatureTypes_pb2

    space = FeatureTypes_pb2.ImageFeatureType.ColorSpace
    return {f.name: space.Name(f.type.imageType.colorSpace) for f in features
            if f.type.WhichOneof("Type") == "imageType"}


def _image_to_array(image: Any, kind: str) -> np.ndarray:
    """Core ML's image feature conversion: pixels as floats in (1, C, H, W), channels in the model's order."""
    a = np.asarray(image, dtype=np.float32)
    if kind.startswith("GRAYSCALE"):
        return a.reshape((1, 1) + a.shape[:2])
    a = np.transpose(a[..., :3], (2, 0, 1))[None]
    return a[:, ::-1] if kind == "BGR" else a


def _array_to_image(a: np.ndarray, kind: str) -> Any:
    from PIL import Image

    a = np.clip(np.round(np.asarray(a, np.float32)), 0, 255).astype(np.uint8)
    if kind.startswith("GRAYSCALE"):
        return Image.fromarray(a.reshape(a.shape[-2:]), mode="L")
    a = a.reshape(a.shape[-3:])
    return Image.fromarray(np.transpose(a[::-1] if kind == "BGR" else a, (1, 2, 0)), mode="RGB")


def _predict(self: Any, data: dict[str, Any], state: Any = None) -> dict[str, Any]:
    ex = _executor(self)
    missing = [t.name for t in ex.inputs if t.name not in data]
    if missing:
        raise KeyError(f"input(s) {missing} missing from the prediction's data")
    images_in = _image_kinds(self._spec.description.input)
    feeds = {t.name: _image_to_array(data[t.name], images_in[t.name]) if t.name in images_in
             else _as_declared(data[t.name], t) for t in ex.inputs}
    _state["predicted"] = True
    out = ex.predict(feeds, state)
    images_out = _image_kinds(self._spec.description.output)
    return {k: _array_to_image(v, images_out[k]) if k in images_out else v for k, v in out.items()}


def _make_state(self: Any) -> dict[str, np.ndarray]:
    return _executor(self).make_state()


def pytest_configure(config: pytest.Config) -> None:
    import coremltools.models.utils as ct_utils
    from coremltools.models import MLModel

    # Before coremltools' test modules import it: module-level skipif marks call it at import.
    ct_utils._macos_version = lambda: _MACOS
    MLModel.predict = _predict
    MLModel.make_state = _make_state
    import coremltools.converters.mil.testing_utils as mil_testing_utils
    import coremltools.converters.mil.frontend.torch.test.testing_utils as torch_testing_utils

    mil_testing_utils._IS_MACOS = True
    torch_testing_utils._IS_MACOS = True


# ---- selection -----------------------------------------------------------------------------------


def read_selection(path: str | os.PathLike) -> list[tuple[str, int | None]]:
    """(pattern, cap) per non-comment line: `PATTERN [max=N]`, PATTERN an fnmatch over test ids.
    A line `!PATTERN` excludes the tests it matches (cap None); selection.txt says why for each."""
    rules = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        pattern, *opts = line.split()
        cap = None
        for opt in opts:
            key, _, val = opt.partition("=")
            if key != "max":
                raise pytest.UsageError(f"{path}: unknown option {opt!r} in line {line!r} (only max=N)")
            cap = int(val)
        rules.append((pattern, cap))
    return rules


def _spread(items: list, cap: int | None) -> list:
    """`cap` items evenly spaced over `items` (all of them when cap is None): a fixed, spread sample."""
    if cap is None or len(items) <= cap:
        return items
    return [items[round(i * (len(items) - 1) / max(cap - 1, 1))] for i in range(cap)]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    path = config.getoption("perch_ct_selection")
    if not path:
        return
    rules = read_selection(path)
    excluded = [p[1:] for p, _ in rules if p.startswith("!")]
    items_in = [it for it in items if not any(fnmatch.fnmatchcase(it.nodeid, p) for p in excluded)]
    chosen: dict[str, pytest.Item] = {}
    for pattern, cap in rules:
        if pattern.startswith("!"):
            continue
        matches = [it for it in items_in if fnmatch.fnmatchcase(it.nodeid, pattern)]
        if not matches:
            raise pytest.UsageError(f"{path}: pattern {pattern!r} matches no collected test")
        for it in _spread(matches, cap):
            chosen.setdefault(it.nodeid, it)
    shard, shards = (int(v) for v in config.getoption("perch_ct_shard").split("/"))
    chosen = {k: it for i, (k, it) in enumerate(sorted(chosen.items())) if i % shards == shard}
    deselected = [it for it in items if it.nodeid not in chosen]
    items[:] = [it for it in items if it.nodeid in chosen]
    config.hook.pytest_deselected(items=deselected)


# ---- classification and report -------------------------------------------------------------------


def pytest_runtest_setup(item: pytest.Item) -> None:
    _state["predicted"] = False


# Frames that make a failure the executor's: its own code, this adapter, and coremltools' comparisons.
_COMPARE = {"convert_and_compare", "compare_backend", "compare_shapes", "run_core_ml_predict", "verify_prediction"}


def _category(excinfo: Any) -> str:
    """conversion: raised inside ct.convert; executor: raised by the executor, by this adapter or by
    coremltools' comparison of a prediction; test: anything else (torch tracing, or the test's own
    assertions about the converted program)."""
    frames = [(str(e.path), e.name) for e in excinfo.traceback]
    if any(f.endswith(os.path.join("coremltools", "converters", "_converters_entry.py")) for f, _ in frames):
        return "conversion"
    mine = os.sep + os.path.join("runtimes", "mil") + os.sep
    if any(mine in f or f == __file__ or name in _COMPARE for f, name in frames):
        return "executor"
    return "test"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" or (report.when == "setup" and not report.passed):
        entry = {"outcome": report.outcome, "category": report.outcome, "reason": "",
                 "predicted": _state["predicted"]}
        if hasattr(report, "wasxfail"):  # coremltools' own xfail marks (known Core ML / torch issues)
            entry["category"] = "xpass" if report.passed else "xfail"
            entry["reason"] = report.wasxfail
        elif report.skipped:
            reason = getattr(call.excinfo.value, "msg", "") if call.excinfo is not None else ""
            entry["category"] = "unsupported" if reason.startswith("unsupported op") else "skipped"
            entry["reason"] = reason
        elif report.failed and call.excinfo is not None:
            entry["category"] = _category(call.excinfo)
            entry["reason"] = _reason(call.excinfo.value)
        _results[item.nodeid] = entry
        log = item.config.getoption("perch_ct_log")
        if log:
            with open(log, "a") as f:  # as it happens: a long run can be read before it ends
                f.write(json.dumps({"test": item.nodeid, **entry}) + "\n")


def _reason(exc: BaseException) -> str:
    """First line of the exception, enough to recognise it again."""
    lines = traceback.format_exception_only(type(exc), exc)
    return " ".join("".join(lines).split())[:300]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = session.config.getoption("perch_ct_report")
    if path:
        import coremltools

        meta = {"coremltools": coremltools.__version__, "numpy": np.__version__, "python": sys.version.split()[0]}
        Path(path).write_text(json.dumps({"meta": meta, "tests": _results}, indent=1, sort_keys=True))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    counts: dict[str, int] = {}
    for entry in _results.values():
        counts[entry["category"]] = counts.get(entry["category"], 0) + 1
    terminalreporter.write_line("perch-ct: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
