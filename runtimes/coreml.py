"""Run a Perch Core ML export behind the step API: Apple's Core ML on macOS, Perch's own executor elsewhere.

The package keeps its state (K,V cache or conv/SSM state) as Core ML state; this runtime feeds `inputIds`
and, for Falcon, the additive `causalMask` built from the running attention mask, whose length tells the
model where the new tokens go. A multifunction package runs `decode` for single tokens and `prefill`
otherwise; both share one state.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from perch.errors import PerchError
from perch.spec import Manifest
from perch.runtimes.base import Runtime, model_inputs

ENGINES = ("auto", "coremltools", "perch")


class _PerchEngine:
    """Perch's numpy executor (perch.runtimes.mil.executor): any OS, fp16 rounding per op."""

    name = "perch-mil"

    def __init__(self, package: Path, functions: list[str]):
        from perch.runtimes.mil.executor import MilExecutor, load_program

        program = load_program(package)
        self.functions = {f: MilExecutor(program, f) for f in functions}
        self.state_shapes = {s.name: s.shape for s in self.functions[functions[0]].states}

    def make_state(self):
        return next(iter(self.functions.values())).make_state()

    def predict(self, function: str, feeds: dict[str, np.ndarray], state) -> dict[str, np.ndarray]:
        return self.functions[function].predict(feeds, state)

    def read_state(self, state, name: str) -> np.ndarray:
        return state[name]


class _CoreMLEngine:
    """Apple's Core ML through coremltools (macOS 15+): MLModel per function, one MLState shared."""

    name = "coreml"

    def __init__(self, package: Path, functions: list[str]):
        import coremltools as ct

        multi = functions != ["main"]
        self.functions = {f: ct.models.MLModel(str(package), function_name=f if multi else None) for f in functions}
        first = next(iter(self.functions.values()))
        desc = first.get_spec().description
        states = desc.functions[0].state if multi else desc.state
        self.state_shapes = {s.name: tuple(s.type.stateType.arrayType.shape) for s in states}

    def make_state(self):
        return next(iter(self.functions.values())).make_state()

    def predict(self, function: str, feeds: dict[str, np.ndarray], state) -> dict[str, np.ndarray]:
        return self.functions[function].predict(feeds, state=state)

    def read_state(self, state, name: str) -> np.ndarray:
        return np.asarray(state.read_state(name))


def _coreml_runtime_available() -> bool:
    if sys.platform != "darwin":
        return False
    try:
        from coremltools import libcoremlpython  # noqa: F401  (the Core ML bridge: macOS wheels only)
    except ImportError:
        return False
    return True


def _open_engine(package: Path, functions: list[str], engine: str):
    if engine not in ENGINES:
        raise PerchError(f"engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if engine == "coremltools" or (engine == "auto" and _coreml_runtime_available()):
        if not _coreml_runtime_available():
            raise PerchError("engine 'coremltools' needs macOS with Core ML (coremltools' libcoremlpython); "
                             "use engine='perch' (Perch's executor) on this machine")
        return _CoreMLEngine(package, functions)
    return _PerchEngine(package, functions)


class CoreMLRuntime(Runtime):
    """A `perch export --to coreml` directory behind the step API.

    engine: "auto" (Core ML on macOS, else Perch's executor), "coremltools" or "perch".
    """

    name = "coreml"

    def __init__(self, path: str | Path, *, engine: str = "auto", manifest: Manifest | None = None):
        path = Path(path)
        manifest = manifest or Manifest.load(path)
        if manifest.format != "coreml":
            raise PerchError(f"{path} holds a {manifest.format!r} export, not Core ML; open it with its own runtime")
        package = path / (manifest.model_file or "model.mlpackage")
        if not package.exists():
            raise PerchError(f"{package} is missing: the export directory is incomplete; re-run `perch export`")
        self.manifest, self.io, self.arch = manifest, manifest.io, manifest.arch
        self.vocab_size, self.max_context = int(manifest.hf_config["vocab_size"]), int(manifest.max_context)
        self.input_names, self.output_names = manifest.names("input"), manifest.names("output")
        self.state_names = manifest.names("state")
        self.functions = dict(manifest.functions)
        self.package_batch = int(manifest.batch_size or 1)
        self.engine = _open_engine(package, list(self.functions), engine)
        self.name = f"coreml[{self.engine.name}]"
        self._check_states()
        self.reset(self.package_batch)

    def _check_states(self) -> None:
        """The package's states must be what the manifest declares: names, batch and context length."""
        for spec in self.io.states:
            name = self.state_names[spec.kind]
            shape = self.engine.state_shapes.get(name)
            expected = (spec.num_layers, *spec.concrete_shape(self.package_batch, self.max_context))
            if shape is None or tuple(shape) != expected:
                raise PerchError(f"the package's state {name!r} is {shape}, but the manifest declares {expected}: "
                                 "manifest and model.mlpackage come from different exports; re-export")

    def _reset(self, batch_size: int) -> None:
        if batch_size != self.package_batch:
            raise PerchError(f"this Core ML package holds state for batch {self.package_batch}, not {batch_size}: "
                             f"Core ML states have a fixed shape; re-export with --batch-size {batch_size}")
        self._state = self.engine.make_state()

    def _function_for(self, query_len: int) -> str:
        fixed = [f for f, q in self.functions.items() if q == query_len]
        return fixed[0] if fixed else next(f for f, q in self.functions.items() if q == "ranged")

    def _forward(self, input_ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        t = input_ids.shape[1]
        canonical = model_inputs(self.io, input_ids, mask, positions)
        feeds = {self.input_names[k]: v for k, v in canonical.items()}
        out = self.engine.predict(self._function_for(t), feeds, self._state)
        return np.asarray(out[self.output_names["logits"]], dtype=np.float32)

    def state(self) -> dict[str, np.ndarray]:
        """Per-layer state as float32 (K,V cut to the tokens stored so far), named like ModelIO."""
        out: dict[str, np.ndarray] = {}
        stacked = {s.kind: self.engine.read_state(self._state, self.state_names[s.kind]) for s in self.io.states}
        for i in range(self.io.states[0].num_layers):
            for spec in self.io.states:
                a = np.asarray(stacked[spec.kind][i], dtype=np.float32)
                if spec.cache_axis is not None:
                    a = np.take(a, np.arange(self.position), axis=spec.cache_axis)
                out[f"{spec.kind}.{i}"] = a
        return out
