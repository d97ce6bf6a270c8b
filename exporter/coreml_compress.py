"""Core ML weight compression, scoped to linear and embedding weights: never rotary tables, norms or convs.

- int8: symmetric per output channel (`constexpr_blockwise_shift_scale`);
- int4: symmetric per block of `block_size` input values (`constexpr_blockwise_shift_scale`);
- palettize4: a 16-entry look-up table per group of 16 output channels (`constexpr_lut_to_dense`), found by
  Perch's 1-D k-means (`kmeans_lut`): 9-12x faster than coremltools' scikit-learn k-means per group at about
  the same error, which is what lets a 7B model palettize on a laptop.

Why scoped: a global config also compresses the rotary cos/sin tables (docs/traps.md, Core ML), and exact positions are
what long contexts depend on; norms and the Mamba conv kernels are tiny and sensitive. The manifest records
what was compressed and what was left alone, and why.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from perch.exporter.quant_recipes import RECIPES, Recipe

PALETTE_GROUP = 16  # output channels sharing one LUT: Apple's recommended granularity for LLM weights
# The --quantize methods this backend offers (name -> Recipe: description, bits_estimate, per-tensor choices).
# The int4 family goes through `recipe_quantize` (Perch's own scale search / GPTQ, uint4 codes with a uint4
# offset per block in constexpr_blockwise_shift_scale); int8 and palettize4 through coremltools' own passes.
METHODS: dict[str, Recipe] = {
    **RECIPES,
    "palettize4": Recipe("palettize4", "16-entry k-means look-up table per group of 16 output channels "
                                       "(constexpr_lut_to_dense)", 4.1, "kmeans"),
}


def kmeans_lut(group: np.ndarray, nbits: int = 4, max_iters: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(LUT, uint8 codes) for one palette group: Lloyd's k-means in one dimension, run to convergence.

    In 1-D each cluster is a run of the sorted values between two midpoints, so one sort and a cumulative sum
    make every iteration 2^nbits binary searches: a 16x4544 group takes ~5 ms where coremltools' scikit-learn
    k-means takes ~60 ms, at 1.00x (Gaussian) and 1.04-1.05x (Student-t) its mean squared error
    (benchmarks/palettize_speed.py). Lloyd can stop in a local optimum; quantile, uniform and density^(1/3)
    starts all reach the same one here. Initialised at the quantiles, so every cluster starts non-empty; a
    cluster that empties keeps its centre."""
    x = np.asarray(group, dtype=np.float64).reshape(-1)
    xs = np.sort(x)
    csum = np.concatenate(([0.0], np.cumsum(xs)))
    k = 1 << nbits
    centres = np.quantile(xs, (np.arange(k) + 0.5) / k)
    for _ in range(max_iters):
        cut = np.searchsorted(xs, (centres[1:] + centres[:-1]) / 2)
        lo, hi = np.r_[0, cut], np.r_[cut, xs.size]
        new = np.where(hi > lo, (csum[hi] - csum[lo]) / np.maximum(hi - lo, 1), centres)
        if np.array_equal(new, centres):
            break
        centres = new
    codes = np.searchsorted((centres[1:] + centres[:-1]) / 2, x).astype(np.uint8)
    return centres.astype(group.dtype), codes


def _const_name(name: str) -> str:
    # An fp32 weight cast for fp16 compute becomes a const named `<name>_to_fp16`.
    return name.removesuffix("_to_fp16")


def _reason(op) -> str:
    users = {child.op_type for out in op.outputs for child in out.child_ops}
    if users == {"gather"}:
        return "rotary table (gathered by position): positions must stay exact"
    # Perch's norms are named norm / ln_f / *_layernorm / ln_attn / ln_mlp after their torch modules.
    if users & {"layer_norm", "rms_norm", "batch_norm"} or "norm" in op.name or "_ln_" in op.name:
        return "norm parameter: tiny and sensitive"
    if "conv" in users:
        return "depthwise conv kernel: tiny"
    return "not a linear or embedding weight (bias, SSM A/D parameter, constant)"


def plan(program, kinds: dict[str, str]) -> tuple[dict[str, str], dict[str, dict]]:
    """(const name -> kind) to compress, and a summary of float consts left alone, by reason."""
    chosen: dict[str, str] = {}
    left: dict[str, dict] = defaultdict(lambda: {"tensors": 0, "params": 0, "examples": []})
    for fn in program.functions.values():
        for op in fn.operations:
            if op.op_type != "const" or op.outputs[0].val is None:
                continue
            val = op.outputs[0].val
            if not isinstance(val, np.ndarray) or val.dtype.kind != "f" or val.size < 16:
                continue
            kind = kinds.get(_const_name(op.name))
            if kind is not None and val.ndim == 2:
                chosen[op.name] = kind
                continue
            entry = left[_reason(op)]
            entry["tensors"] += 1
            entry["params"] += int(val.size)
            if val.ndim == 2:  # float 2-D weights count in bits per weight at their stored size
                entry["params_2d"] = entry.get("params_2d", 0) + int(val.size)
                entry["bits_2d"] = entry.get("bits_2d", 0) + int(val.size) * 8 * val.dtype.itemsize
            if len(entry["examples"]) < 3:
                entry["examples"].append(op.name)
    return chosen, dict(left)


def op_config(method: str, block_size: int):
    """The coremltools op config for `method`."""
    import coremltools.optimize.coreml as cto

    if method == "int8":
        return cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                           weight_threshold=0)
    if method == "int4":
        return cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                           block_size=block_size, weight_threshold=0)
    if method == "palettize4":
        return cto.OpPalettizerConfig(mode="custom", lut_function=kmeans_lut, granularity="per_grouped_channel",
                                      group_size=PALETTE_GROUP, weight_threshold=0)
    raise ValueError(f"unknown compression method {method!r}; expected one of {tuple(METHODS)}")


def _fits(method: str, shape: tuple[int, ...], block_size: int) -> str | None:
    """Why a weight cannot take `method`'s granularity, or None when it can."""
    if method.startswith("int4") and shape[1] % block_size:
        return f"input size {shape[1]} is not a multiple of --block-size {block_size}"
    if method == "palettize4" and shape[0] % PALETTE_GROUP:
        return f"output size {shape[0]} is not a multiple of the palette group {PALETTE_GROUP}"
    return None


@dataclass
class CompressionPlan:
    """Which consts get `config` (by name), and the manifest's account of what was done and left alone."""

    method: str
    names: list[str]
    info: dict
    shapes: dict = field(default_factory=dict)  # const name -> shape, for the bits-per-weight record
    float_bits: dict = field(default_factory=dict)  # const name -> bits per element before compression


def plan_compression(program, method: str, block_size: int, kinds: dict[str, str],
                     tied: tuple[str, ...] = ()) -> CompressionPlan:
    """Decide what to compress in `program` (a pymil Program) without touching any weight value.

    `tied`: const names (as in `kinds`) whose stored copy belongs to another piece (a head tied to the
    embedding, pieced conversion): compressed like it, so the join can point them at it, but not counted.
    """
    chosen, left = plan(program, kinds)
    ops = {op.name: op for fn in program.functions.values() for op in fn.operations if op.name in chosen}
    shapes = {n: op.outputs[0].shape for n, op in ops.items()}
    float_bits = {n: 8 * op.outputs[0].val.dtype.itemsize for n, op in ops.items()}
    names, done, shared = [], defaultdict(int), []
    for name, kind in chosen.items():
        why = _fits(method, shapes[name], block_size)
        if _const_name(name) in tied and not why:
            shared.append(name)
        elif why:
            entry = left.setdefault(why, {"tensors": 0, "params": 0, "examples": []})
            entry["tensors"] += 1
            entry["params"] += int(np.prod(shapes[name]))
            entry["params_2d"] = entry.get("params_2d", 0) + int(np.prod(shapes[name]))
            entry["bits_2d"] = entry.get("bits_2d", 0) + int(np.prod(shapes[name])) * float_bits[name]
            entry["examples"] = (entry["examples"] + [name])[:3]
        else:
            names.append(name)
            done[kind] += 1
    info = {
        "method": method,
        "description": METHODS[method].description,
        "granularity": {"int8": "per_channel", "palettize4": f"per_grouped_channel({PALETTE_GROUP})"}.get(
            method, f"per_block({block_size})"),
        "compressed": {"tensors": len(names), "params": int(sum(np.prod(shapes[n]) for n in names)),
                       "by_kind": dict(done)},
        "left_alone": left,
    }
    if shared:
        info["tied"] = [f"{n} (stored once, with the table it is tied to)" for n in shared]
    if method.startswith("int4"):
        info["block_size"] = block_size
    if method == "palettize4":
        info["palettization"] = "kmeans (1-D Lloyd, to convergence)"
        info["group_size"] = PALETTE_GROUP
    return CompressionPlan(method, names + shared, info, {n: shapes[n] for n in names},
                           {n: float_bits[n] for n in names})


def apply_compression(mlmodel, plan: CompressionPlan, block_size: int, kinds: dict[str, str] | None = None,
                      calibration=None):
    """Compress `mlmodel` as planned; returns a new MLModel.

    coremltools reloads the program from the saved spec and weights, so the caller may (and, for large
    models, should) drop `mlmodel._mil_program` and the torch weights first: then one copy is in memory.
    """
    import coremltools.optimize.coreml as cto

    if plan.method.startswith("int4"):
        from perch.exporter import coreml_recipe

        choices = coreml_recipe.choices_for(plan.method, plan.names, kinds or {}, block_size, calibration)
        plan.info["tensors"] = _grouped({n: c for n, c in choices.items() if n in plan.shapes})
        plan.info.update(_bits_per_weight(choices, plan))
        return coreml_recipe.quantize(mlmodel, choices)
    config = op_config(plan.method, block_size)
    opt = cto.OptimizationConfig(op_name_configs={n: config for n in plan.names})
    if plan.method == "palettize4":
        return cto.palettize_weights(mlmodel, config=opt)
    return cto.linear_quantize_weights(mlmodel, config=opt)


def _grouped(choices: dict) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, (c, _) in choices.items():
        out.setdefault(f"{c.bits}-bit {c.algorithm}, blocks of {c.block}", []).append(name)
    return out


def _bits_per_weight(choices: dict, plan: CompressionPlan) -> dict:
    """Stored bits over parameters, counted as the ONNX manifest counts: every 2-D weight (codes, uint offset
    and float16 scale per block; float ones at their size; rotary tables out), and the linear/embedding weights
    alone (llama.cpp's GGUF count: SSM parameters out)."""
    n = bits = 0
    for name, shape in plan.shapes.items():
        rows, k = int(shape[0]), int(shape[1])
        n += rows * k
        if name in choices:
            c = choices[name][0]
            bits += rows * (k // c.block) * (c.block * c.bits + c.bits + 16)
        else:  # the recipe keeps it float (Mamba's dt_proj in int4-rtn)
            bits += rows * k * plan.float_bits.get(name, 16)
    left = plan.info["left_alone"]
    other = [e for why, e in left.items() if not why.startswith("rotary")]
    linear = [e for why, e in left.items() if why.startswith("input size")]  # linear weights the blocks don't fit
    n2, b2 = sum(e.get("params_2d", 0) for e in other), sum(e.get("bits_2d", 0) for e in other)
    n3, b3 = sum(e.get("params_2d", 0) for e in linear), sum(e.get("bits_2d", 0) for e in linear)
    if not n:
        return {"bits_per_weight": None}
    return {"bits_per_weight": round((bits + b2) / (n + n2), 3),
            "bits_per_linear_weight": round((bits + b3) / (n + n3), 3)}


def merge_info(infos: list[dict]) -> dict:
    """One manifest record for a model compressed piece by piece (exporter/coreml_pieces.py): counts summed,
    reasons merged, bits per weight weighted by each piece's compressed parameters."""
    keys = ("bits_per_weight", "bits_per_linear_weight")
    out = {k: v for k, v in infos[0].items() if k not in ("compressed", "left_alone", "tensors", "tied", *keys)}
    done = {"tensors": 0, "params": 0, "by_kind": defaultdict(int)}
    left: dict[str, dict] = {}
    tensors: dict[str, list] = {}
    bits, weight = dict.fromkeys(keys, 0.0), dict.fromkeys(keys, 0.0)
    for info in infos:
        c = info["compressed"]
        done["tensors"] += c["tensors"]
        done["params"] += c["params"]
        for kind, n in c["by_kind"].items():
            done["by_kind"][kind] += n
        for why, e in info["left_alone"].items():
            entry = left.setdefault(why, {"tensors": 0, "params": 0, "examples": []})
            entry["tensors"] += e["tensors"]
            entry["params"] += e["params"]
            entry["examples"] = (entry["examples"] + e["examples"])[:3]
        for group, names in (info.get("tensors") or {}).items():
            tensors.setdefault(group, []).extend(names)
        if info.get("tied"):
            out["tied"] = out.get("tied", []) + info["tied"]
        for key in keys:
            if info.get(key):
                bits[key] += info[key] * c["params"]
                weight[key] += c["params"]
    out["compressed"] = {**done, "by_kind": dict(done["by_kind"])}
    out["left_alone"] = left
    if tensors:
        out["tensors"] = tensors
    for key in keys:
        if weight[key]:
            out[key] = round(bits[key] / weight[key], 3)
    return out
