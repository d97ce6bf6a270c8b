"""Load a Perch Falcon ONNX export with optimum's `ORTModelForCausalLM`, generate greedily, and compare the
tokens with Perch's own (the `.perch-greedy.json` that onnx_deploy.py writes beside each artifact).

optimum-onnx 0.1.0 needs transformers < 4.58, so this runs in its own environment, without Perch:

    python -m venv optimum-venv
    optimum-venv/bin/pip install torch "transformers<4.58" optimum-onnx onnxruntime
    optimum-venv/bin/python examples/optimum_load.py --artifact onnx/falcon-7b-fp16 \
        --expect onnx/falcon-7b-fp16.perch-greedy.json

Exit 0 when optimum's greedy tokens equal Perch's, 1 when they differ, 2 on bad input.
Falcon only: optimum has no Falcon-Mamba support.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", required=True, help="a Perch ONNX export of a Falcon model")
    p.add_argument("--expect", help="Perch's greedy tokens (default: ARTIFACT.perch-greedy.json)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    return p.parse_args(argv)


def load(artifact: Path, device: str):
    """optimum's ORTModelForCausalLM over our model.onnx: it reads config.json and the ONNX I/O names."""
    from optimum.onnxruntime import ORTModelForCausalLM

    provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    return ORTModelForCausalLM.from_pretrained(str(artifact), file_name="model.onnx", use_cache=True,
                                               provider=provider)


def greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    """n greedy tokens with EOS switched off, as Perch's greedy run does (so both produce exactly n)."""
    import torch

    ids = torch.tensor([prompt_ids], dtype=torch.int64)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    artifact = Path(a.artifact)
    expect = Path(a.expect) if a.expect else artifact.with_name(artifact.name + ".perch-greedy.json")
    if not (artifact / "model.onnx").is_file() or not expect.is_file():
        print(f"optimum_load: need {artifact}/model.onnx and {expect}; run onnx_deploy.py first", file=sys.stderr)
        return 2
    ref = json.loads(expect.read_text())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(artifact))
    same_ids = tok.encode(ref["prompt"]) == ref["prompt_ids"]
    print(f"tokenizer: {type(tok).__name__}, prompt ids {'match' if same_ids else 'DIFFER from'} Perch's")
    t = time.perf_counter()
    model = load(artifact, a.device)
    print(f"loaded {type(model).__name__} from {artifact} ({time.perf_counter() - t:.1f} s), "
          f"use_cache={model.config.use_cache}")
    tokens = greedy(model, ref["prompt_ids"], len(ref["tokens"]))
    print(f"optimum: {tokens}\nperch:   {ref['tokens']}")
    print(f"text: {ref['prompt']}{tok.decode(tokens, skip_special_tokens=True)!r}")
    if tokens != ref["tokens"]:
        print("optimum_load: greedy tokens DIFFER from Perch's", file=sys.stderr)
        return 1
    print(f"greedy tokens match ({len(tokens)} of {len(tokens)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
