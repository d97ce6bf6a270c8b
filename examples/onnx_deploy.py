"""ONNX deployment engineer: export Falcon and Falcon-Mamba to ONNX (fp16 and int4), generate with ONNX
Runtime on CPU or CUDA, and print tokens per second.

    python examples/onnx_deploy.py --model ~/models/falcon-7b --model ~/models/falcon-mamba-7b --out onnx/
    python examples/onnx_deploy.py --model falcon-tiny --model falcon-mamba-tiny --out /tmp/onnx --device cpu

Each (model, precision) pair becomes its own artifact directory `OUT/<model name>-<precision>` holding
model.onnx, manifest.json and the tokenizer; any ONNX Runtime client can load it (see optimum_load.py,
which compares its tokens with the Perch greedy tokens written to `OUT/<dir>.perch-greedy.json`).
Precisions: fp16 (fp16 weights and compute), int4 (MatMulNBits 4-bit weights, fp32 compute: the fast CPU
path), fp32. Run `perch check OUT/<dir>` before shipping one (ci_parity_gate.sh does it in CI).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from perch.exporter.export import export, options_for
from perch.errors import PerchError
from perch.runtimes import open_artifact

PRECISIONS = {"fp16": dict(precision="fp16"), "int4": dict(precision="fp32", quantize="int4"), "fp32": dict(precision="fp32")}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, help="checkpoint directory, hub id or preset (repeatable)")
    p.add_argument("--out", required=True, help="directory for the artifacts")
    p.add_argument("--precision", action="append", choices=list(PRECISIONS), help="repeatable (default: fp16 and int4)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (needs onnxruntime-gpu)")
    p.add_argument("--prompt", default="The for statement is used to iterate over")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-context", type=int, help="longest context the export accepts")
    p.add_argument("--overwrite", action="store_true", help="replace artifact directories that exist")
    return p.parse_args(argv)


def generate(artifact: Path, prompt: str, n: int, device: str) -> tuple[list[int], list[int], str, float, float]:
    """Greedy `n` tokens (EOS not honoured, so every run times the same count).

    Returns (prompt ids, new ids, new text, prefill seconds, decode tokens/s).
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(artifact))
    runtime = open_artifact(artifact, device=device)
    try:
        ids = np.array([tok.encode(prompt)], dtype=np.int64)
        t0 = time.perf_counter()
        logits = runtime.prefill(ids)[:, -1]
        t1 = time.perf_counter()
        new = [int(logits.argmax(-1)[0])]
        for _ in range(n - 1):
            new.append(int(runtime.step(np.array([new[-1]]))[0].argmax()))
        t2 = time.perf_counter()
    finally:
        runtime.close()
    text = tok.decode(new, skip_special_tokens=True)
    return ids[0].tolist(), new, text, t1 - t0, (n - 1) / max(t2 - t1, 1e-9)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    rows = []
    try:
        for model in a.model:
            for precision in a.precision or ["fp16", "int4"]:
                out = Path(a.out) / f"{Path(model).name}-{precision}"
                opts = options_for("onnx", max_context=a.max_context, **PRECISIONS[precision])
                t = time.perf_counter()
                m = export(model, out, opts, overwrite=a.overwrite)
                print(f"exported {out}: {m.arch} {precision} ({time.perf_counter() - t:.1f} s)")
                ids, new, text, prefill_s, tok_s = generate(out, a.prompt, a.max_new_tokens, a.device)
                print(f"  {a.prompt}{text!r}")
                # Beside the artifact, not in it: what optimum_load.py compares another client's tokens with.
                greedy = {"prompt": a.prompt, "prompt_ids": ids, "tokens": new}
                out.with_name(out.name + ".perch-greedy.json").write_text(json.dumps(greedy) + "\n")
                rows.append((out.name, m.arch, precision, prefill_s * 1e3, tok_s))
    except PerchError as e:
        print(f"onnx_deploy: {e}", file=sys.stderr)
        return e.exit_code
    print(f"\nONNX Runtime on {a.device}, {a.max_new_tokens} new tokens:")
    print(f"  {'artifact':<28} {'arch':<13} {'precision':<9} {'prefill ms':>10} {'decode tok/s':>12}")
    for name, arch, precision, prefill_ms, tok_s in rows:
        print(f"  {name:<28} {arch:<13} {precision:<9} {prefill_ms:>10.1f} {tok_s:>12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
