"""Greedy text from a Perch Falcon ONNX export with ONNX Runtime GenAI (pip install onnxruntime-genai).

    perch export tiiuae/falcon-7b --to onnx --out falcon-onnx      # writes genai_config.json too
    python examples/clients/genai_generate.py falcon-onnx "The list type" --max-new-tokens 24
"""
from __future__ import annotations

import argparse

import onnxruntime_genai as og

ap = argparse.ArgumentParser()
ap.add_argument("artifact")
ap.add_argument("prompt")
ap.add_argument("--max-new-tokens", type=int, default=24)
a = ap.parse_args()

model = og.Model(a.artifact)  # reads genai_config.json, model.onnx and the tokenizer files beside them
tokenizer = og.Tokenizer(model)
ids = tokenizer.encode(a.prompt)
params = og.GeneratorParams(model)
params.set_search_options(do_sample=False, max_length=len(ids) + a.max_new_tokens)
generator = og.Generator(model, params)
generator.append_tokens(ids)
new = []
while not generator.is_done() and len(new) < a.max_new_tokens:
    generator.generate_next_token()
    new.append(int(generator.get_next_tokens()[0]))
print("tokens:", new)
print(a.prompt + tokenizer.decode(new))
