"""Load a saved `.mlpackage` into a MIL program on any OS, with its declared inputs, outputs and states.

Apple's Core ML runtime is macOS-only, but coremltools' milproto loader reads the package's
`Data/com.apple.CoreML/model.mlmodel` spec and its `weights/` blobs back into a pymil `Program` on
Linux. `MilExecutor` (runtimes/mil/executor.py) runs that program; this module only loads and
describes it, turning every malformed package into a `PerchError` that names the fix.
"""
from __future__ import annotations

import contextlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from perch.errors import PerchError

SPEC_PATH = Path("Data/com.apple.CoreML/model.mlmodel")
WEIGHTS_DIR = Path("Data/com.apple.CoreML/weights")
BLOB_SENTINEL = 0xDEADBEEF  # first word of each blob's metadata record in a MIL weight file


def weight_bytes(package: str | os.PathLike) -> int:
    """Bytes in a package's weight files (0 when it has none)."""
    weights = Path(package) / WEIGHTS_DIR
    return sum(p.stat().st_size for p in weights.glob("*") if p.is_file()) if weights.is_dir() else 0


@dataclass(frozen=True)
class PackedBlob:
    """A sub-byte weight (uint4 codes, palette indices) left packed in the package's weight file.

    coremltools' loader unpacks every 4-bit code into a byte: 7.2B codes held as ~7 GB for a 3.7 GiB int4
    package. A large program is loaded with these instead (`MilProgram.load(..., packed=True)`): the bytes
    stay in the memory-mapped file and each use unpacks one tensor (`unpack`), freed after that op.
    """

    file: Path
    offset: int  # of the packed data in `file`
    nbytes: int
    nbits: int
    signed: bool
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.int8 if self.signed else np.uint8)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def unpack(self) -> np.ndarray:
        raw = np.memmap(self.file, np.uint8, "r", offset=self.offset, shape=(self.nbytes,))
        if self.nbits == 4 and not self.signed:  # the common case, 2 codes per byte, low nibble first
            codes = np.empty((self.nbytes, 2), np.uint8)
            np.bitwise_and(raw, 0xF, out=codes[:, 0])
            np.right_shift(raw, 4, out=codes[:, 1])
            return codes.reshape(-1)[: self.size].reshape(self.shape)
        from coremltools.optimize._utils import restore_elements_from_packed_bits

        return restore_elements_from_packed_bits(np.asarray(raw), self.nbits, self.size, self.signed).reshape(self.shape)


MAPPED_TENSOR = 1 << 12  # fp16/fp32 blob values at least this many elements are mapped, not copied (packed=True)


def _blob_record(weights: Path, spec: Any, shape: tuple[int, ...], bits: int, what: str) -> tuple[Path, int, int]:
    """(file, offset, nbytes) of a blobFileValue's data, from the metadata record it points at."""
    file = weights / spec.fileName.split("/")[-1]
    with open(file, "rb") as f:
        f.seek(spec.offset)
        sentinel, _, nbytes, data_offset = struct.unpack("<IIQQ", f.read(24))
    if sentinel != BLOB_SENTINEL or nbytes * 8 < int(np.prod(shape)) * bits:
        raise PerchError(f"{file}: no weight record for a {shape} {what} tensor at offset {spec.offset}; "
                         "the package is damaged: re-export it or copy the whole .mlpackage again")
    return file, data_offset, nbytes


def _packed_blob(weights: Path, spec: Any, shape: tuple[int, ...], prim: Any) -> PackedBlob:
    """Where the packed bytes of a sub-byte blobFileValue are."""
    nbits = prim.get_bitwidth()
    file, data_offset, nbytes = _blob_record(weights, spec, shape, nbits, f"uint{nbits}")
    return PackedBlob(file, data_offset, nbytes, nbits, not prim.is_unsigned(), shape)


def _mapped_blob(weights: Path, spec: Any, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A float blobFileValue as a read-only view of the memory-mapped weight file: its pages are the file's
    (shared, reclaimable), not a private copy (coremltools' reader copies each fp16 weight three times and
    keeps one: 14.4 GiB anonymous to run a 12.9 GiB Falcon-7B fp16 package)."""
    file, data_offset, _ = _blob_record(weights, spec, shape, dtype.itemsize * 8, str(dtype))
    return np.memmap(file, dtype, "r", offset=data_offset, shape=shape)


@contextlib.contextmanager
def _weights_left_in_file(weights: Path, found: dict[int, tuple[np.ndarray, PackedBlob]]):
    """While coremltools' milproto loader runs, large weights stay in the weight file: sub-byte blob values
    load as zero-byte placeholders of their shape (stride 0), `found` mapping each placeholder's id to (the
    placeholder, kept alive, its PackedBlob); large fp16/fp32 ones load as memory-mapped views."""
    from coremltools.converters.mil.frontend.milproto import load as milproto
    from coremltools.converters.mil.frontend.milproto.helper import proto_to_types
    from coremltools.converters.mil.mil import types

    original = milproto._load_value

    def load_value(context, value_spec):
        if value_spec.type.WhichOneof("type") == "tensorType" and value_spec.WhichOneof("value") == "blobFileValue":
            t = proto_to_types(value_spec.type)
            prim = t.get_primitive() if types.is_tensor(t) else t
            shape = tuple(int(n) for n in t.get_shape()) if types.is_tensor(t) else ()
            if types.is_sub_byte(prim):
                blob = _packed_blob(weights, value_spec.blobFileValue, shape, prim)
                # coremltools' uint4 numpy dtype (uint8 tagged with its true type): an op checking its input's
                # bit width (constexpr_lut_to_dense's indices) reads the tag, as from the loader's own arrays
                placeholder = np.lib.stride_tricks.as_strided(np.zeros(1, types.nptype_from_builtin(prim)), shape,
                                                              (0,) * len(shape), writeable=False)
                found[id(placeholder)] = (placeholder, blob)
                return placeholder
            if prim in (types.fp16, types.fp32) and int(np.prod(shape)) >= MAPPED_TENSOR:
                return _mapped_blob(weights, value_spec.blobFileValue, shape, np.dtype(types.nptype_from_builtin(prim)))
        return original(context, value_spec)

    milproto._load_value = load_value
    try:
        yield
    finally:
        milproto._load_value = original


@dataclass(frozen=True)
class MilTensor:
    """A declared function input or state.

    `shape` is the default shape; `bounds[i]` is (lower, upper) for axis i (upper None = unbounded);
    `enumerated` lists the allowed shapes when the input uses enumerated shapes instead of ranges.
    """

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    bounds: tuple[tuple[int, int | None], ...]
    enumerated: tuple[tuple[int, ...], ...] = ()

    def accepts(self, shape: tuple[int, ...]) -> bool:
        """Whether an array of `shape` fits this declaration (rank, fixed sizes, ranges)."""
        if self.enumerated:
            return tuple(shape) in self.enumerated
        if len(shape) != len(self.bounds):
            return False
        return all(lo <= n and (hi is None or n <= hi) for n, (lo, hi) in zip(shape, self.bounds))

    def describe(self) -> str:
        if self.enumerated:
            return " or ".join(str(s) for s in self.enumerated)
        dims = [str(lo) if lo == hi else f"{lo}..{'' if hi is None else hi}" for lo, hi in self.bounds]
        return f"({', '.join(dims)})"


def _proto_blob_files(program_proto: Any) -> set[str]:
    """Every weight file a MIL program proto references (const values stored in blobs)."""
    names: set[str] = set()

    def value(v: Any) -> None:
        if v.WhichOneof("value") == "blobFileValue":
            names.add(v.blobFileValue.fileName.split("/")[-1])

    def block(b: Any) -> None:
        for op in b.operations:
            for v in op.attributes.values():
                value(v)
            for arg in op.inputs.values():
                for binding in arg.arguments:
                    if binding.WhichOneof("binding") == "value":
                        value(binding.value)
            for nested in op.blocks:
                block(nested)

    for fn in program_proto.functions.values():
        for b in fn.block_specializations.values():
            block(b)
    return names


def _read_spec(package: Path) -> Any:
    from coremltools import proto

    spec = proto.Model_pb2.Model()
    try:
        spec.ParseFromString((package / SPEC_PATH).read_bytes())
    except Exception as e:  # protobuf raises its own DecodeError
        raise PerchError(f"{package}: {SPEC_PATH} is not a readable Core ML spec ({e}); re-export the model") from e
    return spec


def _check_package(path: str | os.PathLike) -> Path:
    package = Path(path)
    if not package.is_dir() or not (package / SPEC_PATH).is_file():
        what = "does not exist" if not package.exists() else "is not a .mlpackage directory"
        raise PerchError(
            f"{package} {what} (expected {SPEC_PATH} inside); pass a Core ML package saved with "
            "MLModel.save('model.mlpackage') (convert_to='mlprogram')"
        )
    return package


def _tensor_from_feature(name: str, dtype: np.dtype, feature: Any | None, rank_shape: tuple) -> MilTensor:
    """Bounds from the model description's multiArrayType; fall back to the MIL var's shape."""
    if feature is None or feature.type.WhichOneof("Type") != "multiArrayType":
        shape = tuple(int(s) if isinstance(s, (int, np.integer)) else 1 for s in rank_shape)
        bounds = tuple((n, n) if isinstance(s, (int, np.integer)) else (1, None) for n, s in zip(shape, rank_shape))
        return MilTensor(name, dtype, shape, bounds)
    arr = feature.type.multiArrayType
    shape = tuple(int(s) for s in arr.shape)
    flex = arr.WhichOneof("ShapeFlexibility")
    if flex == "shapeRange":
        bounds = tuple((int(r.lowerBound), None if r.upperBound < 0 else int(r.upperBound))
                       for r in arr.shapeRange.sizeRanges)
        return MilTensor(name, dtype, shape, bounds)
    if flex == "enumeratedShapes":
        shapes = tuple(tuple(int(s) for s in e.shape) for e in arr.enumeratedShapes.shapes)
        return MilTensor(name, dtype, shape, tuple((n, n) for n in shape), shapes)
    return MilTensor(name, dtype, shape, tuple((n, n) for n in shape))


class MilProgram:
    """A loaded `.mlpackage`: its spec, its pymil `Program`, and per-function declarations."""

    def __init__(self, path: Path, spec: Any, program: Any,
                 packed: dict[int, tuple[np.ndarray, PackedBlob]] | None = None) -> None:
        self.path = path
        self.spec = spec
        self.program = program
        self._packed = packed or {}  # load(..., packed=True): id(placeholder) -> (placeholder, PackedBlob)

    def packed_blob(self, value: Any) -> PackedBlob | None:
        """The PackedBlob a const value stands for, if it is a placeholder left by load(..., packed=True)."""
        hit = self._packed.get(id(value))
        return hit[1] if hit is not None and hit[0] is value else None

    @classmethod
    def load(cls, path: str | os.PathLike, packed: bool = False) -> MilProgram:
        """Read `path` (a `.mlpackage` directory) with coremltools' milproto loader.

        `packed`: sub-byte weights stay packed in the weight file (PackedBlob) instead of one byte per code;
        their const values are then zero-byte placeholders, so only an executor that unpacks them can run it.
        Large fp16/fp32 weights are then read-only views of the memory-mapped weight file.
        """
        from coremltools.converters.mil.frontend.milproto.load import load as load_milproto

        package = _check_package(path)
        spec = _read_spec(package)
        kind = spec.WhichOneof("Type")
        if kind != "mlProgram":
            raise PerchError(
                f"{package} holds a '{kind}' Core ML model, not an ML program; Perch's executor runs only "
                "ML programs: re-convert with ct.convert(..., convert_to='mlprogram')"
            )
        weights = package / WEIGHTS_DIR
        missing = sorted(n for n in _proto_blob_files(spec.mlProgram) if not (weights / n).is_file())
        if missing:
            raise PerchError(
                f"{package}: weights file(s) {', '.join(missing)} referenced by the program are missing from "
                f"{WEIGHTS_DIR}; the package is incomplete, copy or re-save the whole .mlpackage"
            )
        found: dict[int, tuple[np.ndarray, PackedBlob]] = {}
        try:
            with _weights_left_in_file(weights, found) if packed else contextlib.nullcontext():
                program = load_milproto(spec, spec.specificationVersion, file_weights_dir=str(weights))
        except (ValueError, KeyError, TypeError, NotImplementedError, AssertionError, RuntimeError) as e:
            raise PerchError(f"{package}: coremltools could not load the ML program ({type(e).__name__}: {e})") from e
        return cls(package, spec, program, found)

    @property
    def function_names(self) -> list[str]:
        """Names of the package's functions (one, "main", unless it is a multifunction package)."""
        return list(self.program.functions)

    @property
    def default_function(self) -> str:
        return self.spec.description.defaultFunctionName or "main"

    def function(self, name: str) -> Any:
        """The pymil `Function` called `name`."""
        if name not in self.program.functions:
            raise PerchError(
                f"{self.path} has no function '{name}'; its functions are: {', '.join(self.function_names)}"
            )
        return self.program.functions[name]

    def _description(self, name: str) -> Any:
        for fd in self.spec.description.functions:
            if fd.name == name:
                return fd
        return self.spec.description

    def inputs(self, name: str) -> tuple[MilTensor, ...]:
        """Declared tensor inputs of function `name`, with their flexible-shape bounds."""
        from coremltools.converters.mil.mil import types

        features = {f.name: f for f in self._description(name).input}
        out = []
        for var_name, var in self.function(name).inputs.items():
            if types.is_state(var.sym_type):
                continue
            dtype = np.dtype(types.nptype_from_builtin(var.dtype))
            out.append(_tensor_from_feature(var_name, dtype, features.get(var_name), tuple(var.shape)))
        return tuple(out)

    def states(self, name: str) -> tuple[MilTensor, ...]:
        """Declared states of function `name` (Core ML states are fp16 tensors of fixed shape)."""
        from coremltools.converters.mil.mil import types

        out = []
        for var_name, var in self.function(name).inputs.items():
            if types.is_state(var.sym_type):
                wrapped = var.sym_type.wrapped_type()
                shape = tuple(int(s) for s in wrapped.get_shape())
                dtype = np.dtype(types.nptype_from_builtin(wrapped.get_primitive()))
                out.append(MilTensor(var_name, dtype, shape, tuple((n, n) for n in shape)))
        return tuple(out)
