"""Tensors computed one at a time and kept in a memory-mapped temporary file rather than in anonymous memory.

A dequantized bitsandbytes 7B checkpoint is 13.8 GB of bf16: held in memory, it was the whole of the export's
14.4 GB peak anonymous memory. Written tensor by tensor to an unlinked temporary file and mapped back, the
same values are file-backed pages the kernel can drop and re-read, like a safetensors checkpoint's, and every
consumer (the ONNX writer, the Core ML pieces, the transformers reference) reads them unchanged.

The file lives in `tempfile.gettempdir()` (TMPDIR) and is unlinked as soon as it is mapped, so nothing is left
on disk when the process ends, however it ends. Without room for it there, the tensors stay in memory and a
warning says how much room TMPDIR needs.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from typing import Callable

import numpy as np
import torch

from perch.progress import progress

SPILL_OVER = 256 << 20  # bytes: smaller results stay in memory (a file would save nothing worth its write)
HEADROOM = 1 << 30  # bytes left free on the temporary disk after the file
ALIGN = 64  # byte alignment of each tensor in the file (any dtype's view, and SIMD loads)


def _spill_dir(nbytes: int) -> str | None:
    """The directory to spill `nbytes` into, or None to keep them in memory."""
    if nbytes < SPILL_OVER:
        return None
    where = tempfile.gettempdir()
    free = shutil.disk_usage(where).free
    if free < nbytes + HEADROOM:
        warnings.warn(f"{where} has {free / 2**30:.1f} GiB free, not the {(nbytes + HEADROOM) / 2**30:.1f} GiB "
                      "the dequantized weights need as a memory-mapped file, so they are held in memory "
                      f"({nbytes / 2**30:.1f} GiB); point TMPDIR at a disk with room to keep them out of memory",
                      stacklevel=3)
        return None
    return where


def materialize(makers: dict[str, Callable[[], torch.Tensor]], nbytes: int, label: str) -> dict[str, torch.Tensor]:
    """Run each maker once, in order, holding one result at a time; returns name -> tensor.

    `nbytes` is the results' total size, known beforehand: above SPILL_OVER they go to a mapped file.
    """
    where = _spill_dir(nbytes)
    with progress(len(makers), label, unit="tensor") as bar:
        if where is None:
            out = {}
            for name, make in makers.items():
                out[name] = make()
                bar.advance(1, name)
            return out
        return _spilled(makers, where, bar)


def _spilled(makers: dict, where: str, bar) -> dict[str, torch.Tensor]:
    layout = {}
    with tempfile.NamedTemporaryFile(dir=where, prefix="perch-weights-", suffix=".bin", delete=False) as f:
        try:
            for name, make in makers.items():
                t = make().contiguous()
                f.write(b"\0" * (-f.tell() % ALIGN))
                layout[name] = (f.tell(), t.numel() * t.element_size(), t.dtype, tuple(t.shape))
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
                del t  # the file holds it now
                bar.advance(1, name)
            f.flush()
            # Copy-on-write mapping: pages are the file's until written (nothing here writes them).
            raw = torch.from_numpy(np.memmap(f.name, dtype=np.uint8, mode="c")) if f.tell() else None
        finally:
            os.unlink(f.name)  # the mapping keeps the data; the name goes now, so no exit path leaves it behind
    return {name: (raw[o:o + n] if n else torch.empty(0, dtype=torch.uint8)).view(dtype).reshape(shape)
            for name, (o, n, dtype, shape) in layout.items()}
