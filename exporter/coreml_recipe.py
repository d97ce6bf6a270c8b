"""Core ML int4 recipes (quant_recipes): coremltools' linear_quantize_weights pass with Perch's quantizer inside.

coremltools builds `constexpr_blockwise_shift_scale` ops from whatever `blockwise_compress_by_dtype` returns;
this subclass returns codes from Perch's scale search or GPTQ (the same numbers the ONNX backend packs) for
the consts a recipe names, with each tensor's own bits and block size. Stored: uint4 codes, a uint4 offset
(zero point) and a float16 scale per block: 4 + 4/32 + 16/32 = 4.625 bits per weight at blocks of 32.
"""
from __future__ import annotations

import numpy as np

from perch.exporter import calibration as calib
from perch.exporter import gptq, quant_search
from perch.exporter.quant_recipes import Choice, recipe


def choices_for(method: str, names: list[str], kinds: dict[str, str], block: int, cal) -> dict[str, tuple]:
    """Core ML const name -> (Choice, Hessian or None) for every const the plan compresses."""
    rec, out = recipe(method), {}
    for name in names:
        base = name.removesuffix("_to_fp16")
        kind = kinds.get(base, "linear")
        # const names are module paths with "_" for "."; recipes match checkpoint suffixes with "."
        choice = rec.choice(base.replace("_", "."), kind, block)
        if choice is None:
            continue
        hess = calib.hessian_for(cal, base) if choice.algorithm == "gptq" else None
        if choice.algorithm == "gptq" and hess is None:
            choice = Choice(choice.bits, choice.block, "search")
        out[name] = (choice, hess)
    return out


def _codes(w: np.ndarray, choice: Choice, hess: np.ndarray | None):
    rows, k = w.shape
    x = w.astype(np.float32)
    if choice.algorithm == "gptq" and hess is not None:
        return gptq.gptq(x, hess, choice.bits, choice.block)
    x = x.reshape(rows, k // choice.block, choice.block)
    if choice.algorithm == "search":
        imp = None if hess is None else np.diag(hess).astype(np.float32).reshape(k // choice.block, choice.block)
        return quant_search.search(x, choice.bits, imp)
    return quant_search.rtn(x, choice.bits)


def quantize(mlmodel, choices: dict[str, tuple]):
    """Apply the recipe's choices to `mlmodel` (an MLModel); returns the compressed MLModel."""
    import coremltools.optimize.coreml as cto
    from coremltools.converters.mil.mil import types
    from coremltools.models import utils as model_utils
    from coremltools.optimize import _utils as optimize_utils
    from coremltools.optimize.coreml._quantization_passes import linear_quantize_weights

    class RecipePass(linear_quantize_weights):
        current: str | None = None

        def transform_op(self, op):
            self.current = op.name
            return super().transform_op(op)

        def blockwise_compress_by_dtype(self, original_data, dtype, mode, block_sizes):
            choice, hess = choices[self.current]
            q, s, z = _codes(np.asarray(original_data), choice, hess)
            nptype = types.nptype_from_builtin(types.get_nbits_int_builtin_type(choice.bits, False))
            return optimize_utils.QuantParams(data=q.reshape(original_data.shape).astype(nptype),
                                              scale=s.astype(original_data.dtype), offset=z.astype(nptype),
                                              nbits=np.uint8(choice.bits))

    configs = {n: cto.OpLinearQuantizerConfig(mode="linear", dtype=f"uint{c.bits}", granularity="per_block",
                                              block_size=c.block, weight_threshold=0) for n, (c, _) in choices.items()}
    graph_pass = RecipePass(config=cto.OptimizationConfig(op_name_configs=configs))
    return model_utils._apply_graph_pass(mlmodel, graph_pass)
