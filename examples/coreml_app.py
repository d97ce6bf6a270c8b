"""Mac / iPhone app developer: a local Falcon checkpoint -> a stateful int4 Core ML package, checked, and
described the way the app side sees it.

    python examples/coreml_app.py --model ~/models/falcon-7b-instruct --out falcon-7b-int4
    python examples/coreml_app.py --model falcon-tiny --out /tmp/falcon-tiny-int4   # a built-in preset

Steps: `perch export --to coreml --quantize int4`, then `perch check` (exit 1 stops here: never ship a
package that failed), then the package's inputs, states and outputs read from the package itself, the names
the manifest records, and the tokenizer files next to it. Swift cannot be built here; examples/README.md
describes how swift-transformers loads the package.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from perch.exporter.export import export, options_for
from perch.cli import main as perch_main
from perch.errors import PerchError
from perch.spec import Manifest

SPEC_FILE = Path("Data") / "com.apple.CoreML" / "model.mlmodel"
DTYPES = {65552: "float16", 65568: "float32", 131104: "int32"}  # Core ML ArrayDataType enum values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory, cached hub id or preset name")
    p.add_argument("--out", required=True, help="artifact directory to write (holds model.mlpackage)")
    p.add_argument("--quantize", default="int4", choices=["int4", "int8", "palettize4", "none"])
    p.add_argument("--precision", default="fp16", choices=["fp16", "fp32"],
                   help="fp16 is what the GPU and Neural Engine run")
    p.add_argument("--max-context", type=int, help="longest context the app needs (the K,V cache is this long)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="decode steps `perch check` compares")
    p.add_argument("--report", help="also write the check report (report.md, report.json) here")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p.parse_args(argv)


def features(package: Path) -> dict[str, list[str]]:
    """The package's inputs, states and outputs as 'name dtype shape' lines, read from its spec file."""
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    spec.ParseFromString((package / SPEC_FILE).read_bytes())
    desc = spec.description
    return {"inputs": [_describe(f) for f in desc.input], "states": [_describe(f) for f in desc.state],
            "outputs": [_describe(f) for f in desc.output]}


def _describe(feature) -> str:
    kind = feature.type.WhichOneof("Type")
    array = feature.type.stateType.arrayType if kind == "stateType" else feature.type.multiArrayType
    ranges = list(getattr(array, "shapeRange", None).sizeRanges) if kind == "multiArrayType" else []
    if ranges:  # flexible axes print as lo..hi
        dims = [str(r.lowerBound) if r.lowerBound == r.upperBound else f"{r.lowerBound}..{r.upperBound}" for r in ranges]
    else:
        dims = [str(d) for d in array.shape]
    dtype = DTYPES.get(array.dataType, str(array.dataType))
    return f"{feature.name:<12} {dtype:<8} ({', '.join(dims) or 'batch, new tokens, vocab: set at run time'})"


def print_app_side(out: Path, manifest: Manifest) -> None:
    """What the Swift side needs: feature names and shapes, the swift-transformers keys, the side files."""
    package = out / manifest.model_file
    print(f"\n== what the app needs: {package}")
    for group, lines in features(package).items():
        print(f"{group}:")
        for line in lines:
            print(f"  {line}")
    print("swift-transformers keys (manifest bindings): "
          f"inputs {manifest.names('input')}, states {manifest.names('state')}, outputs {manifest.names('output')}")
    print(f"deployment target {manifest.extras.get('deployment_target')}, max context {manifest.max_context}, "
          f"quantization {manifest.quantization.get('method')} {manifest.quantization.get('granularity', '')}".rstrip())
    side = [n for n in (*manifest.tokenizer_files, "config.json", "generation_config.json") if (out / n).is_file()]
    print(f"tokenizer and config files next to the package: {', '.join(side)}")
    print(f"compile on a Mac:  xcrun coremlc compile {package} {out}/compiled")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    opts = options_for("coreml", precision=a.precision, quantize=a.quantize, max_context=a.max_context)
    try:
        manifest = export(a.model, out, opts, overwrite=a.overwrite)
    except PerchError as e:
        print(f"coreml_app: {e}", file=sys.stderr)
        return e.exit_code
    print(f"exported {out / manifest.model_file}: {manifest.arch}, compute {a.precision}, "
          f"quantize {a.quantize}, max context {manifest.max_context}")
    # The same code path as the `perch check` command line, so its exit code means the same thing.
    check_args = ["check", str(out), "--max-new-tokens", str(a.max_new_tokens)]
    rc = perch_main(check_args + (["--report", a.report] if a.report else []))
    if rc != 0:
        print(f"coreml_app: perch check failed (exit {rc}); do not ship this package", file=sys.stderr)
        return rc
    print_app_side(out, manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
