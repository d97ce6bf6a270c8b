"""Fine-tuning path: train a LoRA adapter with peft (QLoRA-style targets), save it, export base + adapter,
and check the export against base + adapter.

    python examples/lora_merge.py --model ~/models/falcon-7b --out lora-run --steps 200
    python examples/lora_merge.py --model falcon-tiny --out /tmp/lora-run --steps 4

QLoRA trains the adapter over a 4-bit base; transformers 5.23 does not bitsandbytes-quantize Falcon's
FalconLinear layers, so this trains over the full-precision base (same targets, same adapter format). A
QLoRA adapter trained elsewhere merges the same way: `perch export BASE --adapter DIR`.
Writes OUT/adapter (peft's save_pretrained) and OUT/export (the artifact), then runs `perch check OUT/export`:
the manifest records base and adapter, so the reference is base + adapter merged.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from perch.exporter.export import export, options_for
from perch.cli import main as perch_main
from perch.errors import PerchError
from perch.dev.presets import resolve_model
from perch.runtimes import open_artifact

# The projections QLoRA recipes target, per architecture.
TARGETS = {"falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
           "falcon_mamba": ["in_proj", "x_proj", "dt_proj", "out_proj"]}
TEXT = ("The for statement is used to iterate over the elements of a sequence (such as a string, tuple or "
        "list) or other iterable object. A function definition defines a user-defined function object.")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="base checkpoint directory, hub id or preset name")
    p.add_argument("--out", required=True, help="directory for adapter/ and export/")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--to", default="onnx", choices=["onnx", "coreml"])
    p.add_argument("--max-new-tokens", type=int, default=8, help="decode steps `perch check` compares")
    return p.parse_args(argv)


def train_adapter(base: Path, out: Path, steps: int, rank: int, lr: float):
    """A few AdamW steps of LoRA on TEXT; returns the peft model (adapter not merged) and the tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    arch = model.config.model_type
    if arch not in TARGETS:
        raise PerchError(f"{base} is a {arch!r} model; this example trains Falcon or Falcon-Mamba adapters")
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS[arch],
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    ids = torch.tensor([tok.encode(TEXT)])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step in (0, steps - 1):
            print(f"step {step + 1}/{steps}: loss {loss.item():.4f}")
    model.eval()
    model.save_pretrained(str(out))
    trainable, total = model.get_nb_trainable_parameters()
    print(f"saved adapter {out}: r={rank}, targets {TARGETS[arch]}, {trainable} of {total} parameters trained")
    return model, tok


def compare_with_peft(model, tok, artifact: Path) -> tuple[float, float]:
    """Max |logit diff| of the artifact vs peft's own unmerged forward (an independent check), and how far
    the adapter moves the logits from the base (so a dropped adapter cannot pass unnoticed)."""
    ids = np.array([tok.encode(TEXT)[:24]], dtype=np.int64)
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids)).logits.numpy()
        with model.disable_adapter():
            base = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    runtime = open_artifact(artifact)
    try:
        got = runtime.prefill(ids)
    finally:
        runtime.close()
    return float(np.abs(want - got).max()), float(np.abs(want - base).max())


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    try:
        base = Path(resolve_model(a.model))
        model, tok = train_adapter(base, out / "adapter", a.steps, a.rank, a.lr)
        m = export(base, out / "export", options_for(a.to), adapter=out / "adapter", overwrite=True)
    except PerchError as e:
        print(f"lora_merge: {e}", file=sys.stderr)
        return e.exit_code
    print(f"exported {out / 'export'}: {m.arch} {m.format}, adapter {m.source.get('adapter')}")
    diff, moved = compare_with_peft(model, tok, out / "export")
    print(f"prompt logits: export vs peft (unmerged) max |diff| {diff:.2e}; adapter moves them by {moved:.2e}")
    # The reference comes from the manifest (base + adapter). `--reference` takes a model only, no adapter.
    return perch_main(["check", str(out / "export"), "--max-new-tokens", str(a.max_new_tokens)])


if __name__ == "__main__":
    sys.exit(main())
