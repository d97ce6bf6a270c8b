"""ONNX Runtime behind the step API: CPU or CUDA, state kept on the device between steps with IO binding.

Reads only the artifact (manifest + graph), never `exporter`. Before running anything it checks that the
graph is one Perch wrote and that it matches its manifest (names, dtypes, fixed dimensions), so a wrong
or damaged artifact fails with a PerchError naming the problem instead of an error deep inside ORT.

State handling, read from the I/O spec (never from the architecture's name):
- a growing cache (a "context" axis): each step's presents stay on the device and are bound as the next
  pasts (ORT allocates the grown cache; nothing crosses to the host but the logits);
- fixed-size states (conv/SSM): double-buffered, two sets of device buffers swap roles;
- the in-place variant: one max-context buffer per layer and kind, bound as both past and present, so
  GroupQueryAttention writes the new K,V in place.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from perch.errors import PerchError
from perch.spec import LOGITS_TO_KEEP, Manifest
from perch.runtimes.base import Runtime, available_bytes, model_inputs
from perch.runtimes.onnx_session import DEFAULT_WORKLOAD, PREFILL_CHUNK, apply as apply_workload

ORT_TYPES = {"tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(float)": "float32",
             "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16"}


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise PerchError("onnxruntime is not installed: pip install onnxruntime "
                         "(or onnxruntime-gpu for CUDA)") from None
    return onnxruntime


def parse_device(device: str) -> tuple[str, int]:
    """"cpu", "cuda" or "cuda:N" -> (ORT device type, device id)."""
    kind, _, idx = str(device).partition(":")
    if kind not in ("cpu", "cuda") or (idx and not idx.isdigit()):
        raise PerchError(f"device {device!r}: use cpu, cuda or cuda:N")
    return kind, int(idx or 0)


def providers_for(device: str) -> list:
    """The execution providers for a device; CUDA needs onnxruntime-gpu with its CUDA libraries."""
    kind, idx = parse_device(device)
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    available = _ort().get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise PerchError(f"device {device!r} needs onnxruntime-gpu (CUDAExecutionProvider); this onnxruntime "
                         f"offers {', '.join(available)}. Install onnxruntime-gpu, or run with --device cpu")
    return [("CUDAExecutionProvider", {"device_id": idx}), "CPUExecutionProvider"]


def _dim_problem(where: str, name: str, want, got) -> str | None:
    if isinstance(want, int) and isinstance(got, int) and want != got:
        return f"{where} {name!r}: dimension {got} in the graph, {want} in the manifest"
    return None


def check_graph(session, manifest: Manifest) -> None:
    """Every mismatch between the graph and the manifest, reported together as one PerchError."""
    meta = session.get_modelmeta()
    custom = meta.custom_metadata_map or {}
    problems = []
    if meta.producer_name != "perch":
        problems.append(f"the graph was produced by {meta.producer_name or 'an unknown tool'!r}, not `perch export`")
    elif custom.get("perch.arch") != manifest.arch or custom.get("perch.variant", "default") != manifest.variant:
        problems.append(f"the graph is {custom.get('perch.arch')}/{custom.get('perch.variant')}, the manifest says "
                        f"{manifest.arch}/{manifest.variant}")
    want_in, want_out = _expected(manifest, problems)
    for where, want, got in (("input", want_in, session.get_inputs()), ("output", want_out, session.get_outputs())):
        problems += _compare(where, want, {g.name: g for g in got})
    if problems:
        raise PerchError("the ONNX graph does not match its manifest (re-export the model, or pass the directory "
                         "`perch export` wrote):\n  - " + "\n  - ".join(problems))


def _expected(manifest: Manifest, problems: list[str]) -> tuple[dict, dict]:
    """Graph name -> (shape, dtype) the manifest promises: shapes and dtypes from its I/O spec (the truth),
    names from its bindings. A spec entry without a binding is a problem of the manifest itself."""
    io, sides = manifest.io, ({}, {})
    for role, specs, side in (("input", io.inputs, 0), ("output", io.outputs, 1)):
        names = manifest.names(role)
        for t in specs:
            if t.name not in names:
                problems.append(f"{role} {t.name!r} has no binding in the manifest")
            sides[side][names.get(t.name, t.name)] = (t.shape, t.dtype)
    for role, side in (("past", 0), ("present", 1)):
        for canonical, name in manifest.names(role).items():
            s = io.state(canonical.split(".")[0])
            # a present's grown axis is named by the backend (past + new): its binding carries that shape
            sides[side][name] = (s.shape if role == "past" else manifest.binding(role, canonical).shape, s.dtype)
    return sides


def _compare(where: str, want: dict, got: dict) -> list[str]:
    problems = [f"{where} {n!r} is in the manifest but not in the graph" for n in want if n not in got]
    problems += [f"{where} {n!r} is in the graph but not in the manifest" for n in got if n not in want]
    for name in want.keys() & got.keys():
        shape, dtype = want[name]
        g = got[name]
        if ORT_TYPES.get(g.type, g.type) != dtype:
            problems.append(f"{where} {name!r}: {ORT_TYPES.get(g.type, g.type)} in the graph, {dtype} in the manifest")
        if len(g.shape) != len(shape):
            problems.append(f"{where} {name!r}: rank {len(g.shape)} in the graph, {len(shape)} in the manifest")
            continue
        problems += filter(None, (_dim_problem(where, name, w, d) for w, d in zip(shape, g.shape)))
    return problems


def check_files(directory: Path, manifest: Manifest) -> Path:
    """The model file, present and of the size the manifest recorded (a truncated copy fails here, not in ORT)."""
    path = directory / (manifest.model_file or "model.onnx")
    if not path.is_file():
        raise PerchError(f"{path} is missing; the export is incomplete: re-export the model")
    files = manifest.files or [path.name]
    missing = [f for f in files if not (directory / f).is_file()]
    if missing:
        raise PerchError(f"{directory}: {', '.join(missing)} missing (external weights travel with model.onnx); "
                         "copy the whole directory")
    size, want = sum((directory / f).stat().st_size for f in files), manifest.model_bytes
    if want is not None and size != want:
        raise PerchError(f"{directory}: model files hold {size} bytes, the manifest recorded {want}; "
                         "the copy is truncated or was modified: copy or export it again")
    return path


# ONNX Runtime's x86 CPU kernels compute fp16 graphs in fp32: its cast insertion upcasts every fp16 weight at
# load. falcon-mid fp16 (417 MiB of weights): +611 MiB at session creation, 919 MiB peak; a 13.4 GB Falcon-7B
# fp16 export was killed by the kernel at 18.8 GB on a 24 GiB machine (BENCHMARKS.md, issue 12).
FP16_ON_CPU = 2.2  # peak memory / fp16 weight bytes, as measured above


def check_fp16_fits(directory: Path, manifest: Manifest) -> None:
    """Refuse, before ORT is asked, an fp16 export that cannot fit in this machine's memory on the CPU."""
    if manifest.dtype != "fp16" or manifest.quantization.get("method", "none") != "none":
        return
    weights = sum((directory / f).stat().st_size for f in (manifest.files or [manifest.model_file or "model.onnx"]))
    need, avail = FP16_ON_CPU * weights, available_bytes()
    if need > avail:
        raise PerchError(
            f"{directory}: an fp16 ONNX export of {weights / 1e9:.1f} GB runs on ONNX Runtime's CPU kernels in fp32, "
            f"which needs ~{need / 1e9:.0f} GB here and {avail / 1e9:.0f} GB is available. Run it on a GPU "
            "(--device cuda), or export for the CPU with `perch export ... --to onnx --quantize int4` (or int8)")


def split_fused_kv(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers.js' fused "key_value.i" (K then V on the last axis) -> the canonical "key.i", "value.i"."""
    out = {}
    for name, a in state.items():
        kind, _, layer = name.rpartition(".")
        if kind == "key_value":
            hd = a.shape[-1] // 2
            out[f"key.{layer}"], out[f"value.{layer}"] = a[..., :hd], a[..., hd:]
        else:
            out[name] = a
    return out


def check_context(session, manifest: Manifest) -> None:
    """The manifest's max_context must be the one the graph was built for (its rotary tables end there)."""
    built = session.get_modelmeta().custom_metadata_map.get("perch.max_context")
    if built is not None and int(built) != int(manifest.max_context):
        raise PerchError(f"manifest.json says max_context {manifest.max_context}, but the model was exported for "
                         f"{built}: the manifest was edited or mixed up; re-export with --max-context")


def open_session(path: Path, providers: list, threads: int | None = None, workload: str = DEFAULT_WORKLOAD):
    ort = _ort()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: ORT warns about harmless unused initializers
    apply_workload(opts, workload)
    if threads:
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as e:  # ORT raises InvalidProtobuf, Fail, InvalidGraph, NoSuchFile ... for one cause
        raise PerchError(f"onnxruntime cannot load {path}: {str(e).strip()[:400]}. The file is corrupt, truncated "
                         "or not an ONNX model: re-export it with `perch export --to onnx`") from e


class OnnxRuntime(Runtime):
    """An ONNX export behind the step API. `device`: "cpu", "cuda" or "cuda:N"; `threads`: ORT intra-op threads;
    `workload`: session options (runtimes/onnx_session.py)."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, *, device: str = "cpu", threads: int | None = None,
                 manifest: Manifest | None = None, workload: str = DEFAULT_WORKLOAD):
        self.path = Path(path)
        self.manifest = manifest or Manifest.load(self.path)
        if self.manifest.format != "onnx":
            raise PerchError(f"{path} holds a {self.manifest.format} export, not ONNX; open it with its own runtime")
        self.io, self.variant = self.manifest.io, self.manifest.variant
        self.vocab_size = int(self.manifest.hf_config["vocab_size"])
        self.max_context = int(self.manifest.max_context)
        self.device, self.device_id = parse_device(device)
        model_file = check_files(self.path, self.manifest)
        if self.device == "cpu":
            check_fp16_fits(self.path, self.manifest)
        self.session = open_session(model_file, providers_for(device), threads, workload)
        check_graph(self.session, self.manifest)
        check_context(self.session, self.manifest)
        self.input_names = self.manifest.names("input")
        self.past_names = list(self.manifest.names("past").items())  # [(canonical "key.0", graph name)]
        self.present_names = list(self.manifest.names("present").items())
        self._binding = None
        self.prefill_chunk = PREFILL_CHUNK
        # exports before logits_to_keep lack the input: they compute every position, as they always did
        self.keeps_last = LOGITS_TO_KEEP in {i.name for i in self.session.get_overridable_initializers()}
        self.reset(1)

    # ---------------------------------------------------------------- device tensors
    def _on_device(self, array: np.ndarray):
        return _ort().OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, self.device_id)

    def _zeros(self, batch_size: int, context: int) -> dict:
        states = {s.kind: s for s in self.io.states}
        return {key: self._on_device(np.zeros(states[key.split(".")[0]].concrete_shape(batch_size, context),
                                              np.dtype(states[key.split(".")[0]].dtype)))
                for key, _ in self.past_names}

    def _reset(self, batch_size: int) -> None:
        # Inplace buffers and Mamba states have no "context" axis left; default Falcon starts at length 0.
        self.values = self._zeros(batch_size, 0)
        self.spare = self._zeros(batch_size, 0) if self._fixed_state() and self.variant == "default" else None
        self._binding = None

    def _fixed_state(self) -> bool:
        return all("context" not in s.shape for s in self.io.states)

    # ---------------------------------------------------------------- running
    def _forward(self, input_ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        b, t = input_ids.shape
        past = mask.shape[1] - t
        if self.variant == "inplace" and b > 1 and t > 1 and past > 0:
            # GroupQueryAttention takes a multi-token chunk after a non-empty cache only at batch 1 (without
            # its newer query_seqlens input): feed such a chunk one token at a time, same result.
            return np.concatenate([self._run(input_ids[:, j : j + 1], mask[:, : past + j + 1], positions[:, j : j + 1])
                                   for j in range(t)], axis=1)
        if self._fixed_state() and t > self.prefill_chunk:
            # Fixed-size state continues exactly across calls: a long prompt in chunks bounds the per-token
            # activations of the Scan prefill (~2 MiB per token for falcon-mamba-mid) at no cost in results.
            c = self.prefill_chunk
            return np.concatenate([self._run(input_ids[:, j : j + c], mask[:, : past + j + c], positions[:, j : j + c])
                                   for j in range(0, t, c)], axis=1)
        return self._run(input_ids, mask, positions)

    def _run(self, input_ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        binding = self.session.io_binding()
        for name, array in model_inputs(self.io, input_ids, mask, positions).items():
            binding.bind_ortvalue_input(self.input_names[name], self._on_device(array))
        for key, name in self.past_names:
            binding.bind_ortvalue_input(name, self.values[key])
        if self.last_only and self.keeps_last:  # every chunk's last row: the caller keeps the final one
            binding.bind_ortvalue_input(LOGITS_TO_KEEP, self._on_device(np.array(1, np.int64)))
        binding.bind_output(self.manifest.names("output")["logits"], "cpu")  # only the logits reach the host
        for key, name in self.present_names:
            if self.variant == "inplace":
                binding.bind_ortvalue_output(name, self.values[key])  # same buffer: written in place
            elif self.spare is not None:
                binding.bind_ortvalue_output(name, self.spare[key])
            else:
                binding.bind_output(name, self.device, self.device_id)
        try:
            self.session.run_with_iobinding(binding)
        except Exception as e:  # a failure inside ORT: report it as ours, with what was fed
            stored = mask.shape[1] - input_ids.shape[1]
            raise PerchError(f"onnxruntime failed on input_ids {input_ids.shape} after {stored} "
                             f"stored tokens: {str(e).strip()[:400]}") from e
        outputs = binding.get_outputs()
        if self.variant != "inplace":
            if self.spare is not None:
                self.values, self.spare = self.spare, self.values
            else:
                self.values = {key: v for (key, _), v in zip(self.present_names, outputs[1:])}
        self._binding = binding
        return outputs[0].numpy().copy()  # numpy() is a view of ORT's buffer; the caller keeps the logits

    def state(self) -> dict[str, np.ndarray]:
        """The stored state as float32 host arrays; in-place buffers cut to the tokens stored so far."""
        if self.device == "cpu":
            arrays = {k: v.numpy() for k, v in self.values.items()}
        elif self._binding is None:
            return {k: np.zeros(v.shape(), np.float32) for k, v in self.values.items()}
        else:  # device tensors reach the host through the binding that produced them
            host = self._binding.copy_outputs_to_cpu()[1:]
            arrays = {key: a for (key, _), a in zip(self.present_names, host)}
        if self.variant == "inplace":  # fixed buffers: cut each to the tokens stored, along its cache axis
            axis = {s.kind: s.cache_axis for s in self.io.states}
            arrays = {k: np.take(a, np.arange(self.position), axis=axis[k.split(".")[0]]) for k, a in arrays.items()}
        return split_fused_kv({k: a.astype(np.float32) for k, a in arrays.items()})

    def close(self) -> None:
        self.values, self.spare, self._binding, self.session = {}, None, None, None
