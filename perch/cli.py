"""`perch`: one console script, a thin dispatcher over library functions.

Library code raises PerchError (exit 2) or CheckFailed (exit 1); only this module turns them into exit codes.
Heavy imports (torch, coremltools, onnxruntime) happen inside the subcommands so `perch --help` is instant.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from perch import __version__
from perch.archs import ARCH_MODULES
from perch.errors import CheckFailed, PerchError
from perch.exporter.options import OPTIONS, PRECISIONS

FIXTURE_ARCHS = list(ARCH_MODULES)  # every architecture has a trained fixture (perch/dev/fixtures.py)

def cmd_export(a: argparse.Namespace) -> int:
    if a.list:
        from perch.archs import describe_supported
        from perch.dev.presets import describe

        print(describe_supported())
        print()
        print(describe())
        return 0
    if not a.model or not a.to or not a.out:
        raise PerchError("perch export needs MODEL, --to and --out (or --list); see `perch export --help`")
    from perch.exporter.export import describe_quantization, export
    from perch.exporter.options import options_for

    opts = options_for(a.to, precision=a.precision, quantize=a.quantize, block_size=a.block_size,
                       max_context=a.max_context, variant=a.variant, multifunction=a.multifunction,
                       batch_size=a.batch_size, profile=a.profile, calibration=a.calibration, pieced=a.pieced)
    m = export(a.model, a.out, opts, adapter=a.adapter, allow_pickle=a.allow_pickle, overwrite=a.overwrite)
    bpw = m.quantization.get("bits_per_weight")
    print(f"wrote {a.out}/{m.model_file}: {m.arch}, {m.format} {m.dtype}, quantize={m.quantization.get('method')}"
          f"{f' ({bpw} bits per weight)' if bpw else ''}, max context {m.max_context}")
    for client, verdict in m.extras.get("clients", {}).items():  # say plainly which clients can run it
        print(f"  {client}: {verdict}")
    if m.quantization.get("method", "none") != "none":  # say what was not quantized, and why
        print(f"quantization: {describe_quantization(m.quantization)}")
    if not m.tokenizer_files:
        print(f"warning: {a.model} has no tokenizer files, so none was shipped; the artifact takes token ids "
              "(copy the tokenizer into it for `perch generate`)", file=sys.stderr)
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    from perch.runtimes.generate import Sampling, generate_text

    runtime, tokenizer = open_for_generation(a.model, a.device, a.allow_pickle, a.adapter)
    sampling = Sampling(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed)
    print(a.prompt, end="", flush=True)
    generate_text(runtime, tokenizer, a.prompt, a.max_new_tokens, sampling=sampling, stop=tuple(a.stop),
                  on_text=lambda t: print(t, end="", flush=True))
    print()
    return 0


def open_for_generation(model: str, device: str, allow_pickle: bool, adapter: str | None):
    """An exported artifact directory runs in its runtime; a checkpoint or preset runs in transformers."""
    from transformers import AutoTokenizer

    from perch.dev.presets import resolve_model
    from perch.spec import MANIFEST_NAME

    if (Path(model) / MANIFEST_NAME).is_file():
        from perch.runtimes import open_artifact

        return open_artifact(model, device=device), AutoTokenizer.from_pretrained(model)
    from perch.runtimes.pytorch.reference import ReferenceRuntime

    path = resolve_model(model)
    runtime = ReferenceRuntime(path, device=device, allow_pickle=allow_pickle, adapter=adapter)
    return runtime, AutoTokenizer.from_pretrained(runtime.checkpoint.model_dir)


def cmd_check(a: argparse.Namespace) -> int:
    from perch.validate.runner import check_artifact

    report = check_artifact(a.artifact, reference=a.reference, prompts=a.prompts, max_new_tokens=a.max_new_tokens,
                            device=a.device, reference_dtype=a.reference_dtype, speed=a.speed,
                            report_dir=a.report, bisect=a.bisect, quiet=a.json)
    if a.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.summary())
    if not report.passed:
        raise CheckFailed(report.failure_line())
    return 0


def cmd_train_fixture(a: argparse.Namespace) -> int:
    from perch.dev.fixtures import train_fixture

    info = train_fixture(a.arch, a.out, steps=a.steps, seed=a.seed, minutes=a.minutes)
    print(json.dumps(info, indent=2))
    return 0


def cmd_presets(a: argparse.Namespace) -> int:
    from perch.dev.presets import describe, preset_dir

    if a.materialize:
        print(preset_dir(a.materialize))
    else:
        print(describe())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="perch", description="Export Falcon / Falcon-Mamba to Core ML and ONNX, and prove it.")
    p.add_argument("--version", action="version", version=f"perch {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    e = sub.add_parser("export", help="export a model to ONNX or Core ML (--list: supported architectures)")
    e.add_argument("model", nargs="?", help="checkpoint directory, hub id in the local HF cache, or preset name")
    e.add_argument("--list", action="store_true", help="print supported architectures and presets")
    e.add_argument("--to", choices=list(OPTIONS))
    e.add_argument("--out", help="output directory (must not exist)")
    e.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="ONNX: weights and compute; Core ML: compute (its states are fp16)")
    e.add_argument("--quantize", default="none", choices=sorted({q for c in OPTIONS.values() for q in c.QUANTIZE}),
                   help="; ".join(f"{b}: {', '.join(c.QUANTIZE)}" for b, c in OPTIONS.items()))
    e.add_argument("--block-size", type=int, default=32, help="int4 block size (16, 32, 64 or 128)")
    e.add_argument("--calibration", help="int4 / int4-mixed (GPTQ): text file to calibrate on "
                   "(default: Perch's built-in corpus, train split)")
    e.add_argument("--max-context", type=positive_int, help="longest context the artifact accepts (default: min(model's, 2048))")
    e.add_argument("--variant", default="default", choices=["default", "inplace"],
                   help="ONNX: inplace = fixed-size K,V buffers updated by GroupQueryAttention (fast decode)")
    e.add_argument("--multifunction", action="store_true", help="Core ML: prefill and decode functions sharing state")
    e.add_argument("--batch-size", type=int, default=1, help="Core ML: the fixed batch of its states")
    e.add_argument("--pieced", action=argparse.BooleanOptionalAction, default=None,
                   help="Core ML: convert layer by layer and join (default: for models above 1.5B parameters)")
    e.add_argument("--for", dest="profile", default="default", metavar="CLIENT",
                   help="name and lay out the artifact for a client: swift-transformers (Core ML), transformers.js, "
                        "genai, optimum (ONNX); default: the backend's layout, which optimum and genai read as is")
    add_model_source_flags(e)
    e.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    e.set_defaults(fn=cmd_export)

    g = sub.add_parser("generate", help="generate text from an exported artifact, a checkpoint or a preset")
    g.add_argument("model", help="artifact directory, checkpoint directory, hub id or preset name")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=positive_int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    add_model_source_flags(g)
    g.set_defaults(fn=cmd_generate)

    c = sub.add_parser("check", help="compare an artifact with the reference: fidelity and speed")
    c.add_argument("artifact", help="directory written by perch export")
    c.add_argument("--reference", help="model to compare against (default: the one in the manifest)")
    c.add_argument("--prompts", help="text file, one prompt per line")
    c.add_argument("--max-new-tokens", type=positive_int, default=8)
    c.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    c.add_argument("--reference-dtype", default="float32", choices=["float32", "float16", "bfloat16", "bnb4", "bnb8"])
    c.add_argument("--speed", action="store_true", help="also time prefill and decode, side by side")
    c.add_argument("--report", help="write report.json, report.md and plots into this directory")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.add_argument("--bisect", action="store_true", help="on failure, find the first drifting step and layer")
    c.set_defaults(fn=cmd_check)

    t = sub.add_parser("train-fixture", help="train a small Falcon or Falcon-Mamba on Python's own docs (offline)")
    t.add_argument("arch", choices=FIXTURE_ARCHS)
    t.add_argument("--out", required=True)
    t.add_argument("--steps", type=int, help="training steps (default: the fixture's, reproducible)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--minutes", type=float, help="time cap (a capped run is not reproducible)")
    t.set_defaults(fn=cmd_train_fixture)

    s = sub.add_parser("presets", help="list built-in presets, or write one to the cache (--materialize NAME)")
    s.add_argument("--materialize", metavar="NAME")
    s.set_defaults(fn=cmd_presets)
    return p


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1 (argparse turns the ValueError into exit 2)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give a count of at least 1") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} must be at least 1")
    return n


def add_model_source_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", help="PEFT LoRA adapter directory, merged before use")
    p.add_argument("--allow-pickle", action="store_true", help="allow a pickle .bin checkpoint (only if you trust it)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (PerchError, CheckFailed) as e:
        print(f"perch {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
