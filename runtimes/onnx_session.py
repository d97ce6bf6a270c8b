"""ONNX Runtime session options per workload, for the CPU (and the CUDA provider's host side).

ORT's defaults suit a server: a memory arena that grows in powers of two and keeps what it took, memory
patterns planned per input shape, and worker threads that spin between ops. For one process generating
text on a laptop those cost memory (the arena rounds every initializer and activation block up) or burn a
core while idle. Each workload below is a small dict of options; `benchmarks/onnx_rss.py` measures them.
"""
from __future__ import annotations

# name -> (SessionOptions attributes, session config entries)
WORKLOADS: dict[str, tuple[dict, dict]] = {
    # ORT as it comes.
    "ort-default": ({}, {}),
    # Generation at batch 1: weights allocated exactly (outside the arena, which would round them up and
    # never give back), arena grown by what is asked, threads that spin (a decode step is many small ops).
    "generate": ({}, {"session.use_device_allocator_for_initializers": "1"}),
    # Least memory: no arena and no planned patterns either; slower when shapes change every call.
    "low-memory": ({"enable_cpu_mem_arena": False, "enable_mem_pattern": False},
                   {"session.use_device_allocator_for_initializers": "1"}),
    # A machine shared with other work: no spinning, so idle workers leave their cores to others.
    "shared": ({}, {"session.use_device_allocator_for_initializers": "1", "session.intra_op.allow_spinning": "0",
                    "session.inter_op.allow_spinning": "0"}),
}
DEFAULT_WORKLOAD = "generate"
# Tokens per prefill call for fixed-state graphs (Falcon-Mamba): peak RSS grows with the tokens of one call
# (falcon-mamba-mid int4: 297 MiB at 32 tokens, 512 at 128, 800 at 256), the state carries over exactly.
PREFILL_CHUNK = 32


def apply(opts, workload: str) -> None:
    """Set `workload`'s options on an `onnxruntime.SessionOptions`."""
    from perch.errors import PerchError

    if workload not in WORKLOADS:
        raise PerchError(f"workload {workload!r}: choose one of {', '.join(WORKLOADS)}")
    attrs, entries = WORKLOADS[workload]
    for name, value in attrs.items():
        setattr(opts, name, value)
    for key, value in entries.items():
        opts.add_session_config_entry(key, value)
