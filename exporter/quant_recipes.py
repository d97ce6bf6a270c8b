"""The 4/8-bit weight recipes both backends offer, as data: which algorithm and block size each tensor gets.

A recipe maps a weight (by its checkpoint name and kind: "linear", "embedding") to a `Choice` of bits,
block size and algorithm; the backend quantizers (onnx_quant, coreml_compress) only pack what it says.
Chosen by measurement on the trained fixtures (benchmarks/quant_quality.py, BENCHMARKS.md "4-bit quality"):

- GPTQ over min/max rounding cut mean KL by 2.6x (Falcon) and 1.5x (Falcon-Mamba) at the same size;
- the embedding at blocks of 16 cut it a further ~10% for +0.17 bits per weight on Falcon-Mamba, where
  the lm_head at blocks of 16 bought less for the same bits;
- Mamba's dt_proj (input size dt_rank) at 8 bits, blocks of 16, matched float within noise at a quarter of
  its float size, where the old recipe left it float.

Every recipe stores scales as float16 (ONNX: cast to float32 in the graph, folded at load), so the body of
a model costs 4 + 16/32 + 4/32 = 4.625 bits per weight at blocks of 32.
"""
from __future__ import annotations

from dataclasses import dataclass

EMBEDDING_BLOCK = 16  # finer blocks for the embedding (see above); never coarser than the base block
DT_PROJ = "mixer.dt_proj.weight"
HEAD = "lm_head.weight"


@dataclass(frozen=True)
class Choice:
    bits: int
    block: int
    algorithm: str  # "rtn" (min/max), "search" (quant_search.search), "gptq" (gptq.gptq, needs calibration)


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    bits_estimate: float  # bits per weight of a large model's body (the CLI's help; manifests hold the measured)
    algorithm: str
    bits: int = 4
    embedding_block: int | None = None  # None: the base block
    head_block: int | None = None
    dt_proj_bits: int | None = None  # None: keep Mamba's dt_proj float
    calibration: bool = False

    def choice(self, name: str, kind: str, block: int) -> Choice | None:
        """The choice for one weight (checkpoint name, or a Core ML const name with "_" for "."), or None: float."""
        name = name.replace(".", "_")
        if name.endswith(DT_PROJ.replace(".", "_")):
            return None if self.dt_proj_bits is None else Choice(self.dt_proj_bits, 16, "rtn")
        if kind == "embedding" and self.embedding_block:
            # no activations reach a Gather's table: error-minimising search, no Hessian
            return Choice(self.bits, min(self.embedding_block, block), "search" if self.algorithm != "rtn" else "rtn")
        if name.endswith("lm_head_weight") and self.head_block:
            return Choice(self.bits, min(self.head_block, block), self.algorithm)
        return Choice(self.bits, block, self.algorithm)

    def tied_choice(self, block: int) -> Choice:
        """The choice for a table that is both the embedding and the lm_head, stored once (ONNX).

        The head's bits and block: the head is where the table costs time. ORT's MatMulNBits runs a
        65024-row head 1.6-1.75x slower in blocks of 16 than of 32 (benchmarks/tied_head.py), so a tied
        table at the embedding's 16 made every decode step pay for a finer lookup. Codes by the scale search
        (or min/max for rtn): a table that also serves a lookup has no one Hessian for GPTQ. Core ML keeps
        the embedding's choice for a tied table: Apple's runtime, not ORT's kernel, runs it, and its speed
        cannot be measured on Linux.
        """
        head = self.choice(HEAD, "linear", block)
        return Choice(head.bits, head.block, "rtn" if head.algorithm == "rtn" else "search")


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("int4", "GPTQ 4-bit (calibrated on built-in text or --calibration FILE), embedding in blocks of 16 "
                   "(tied to the lm_head: the head's 32), Mamba dt_proj 8-bit: the lowest KL per bit measured", 4.7, "gptq",
           embedding_block=EMBEDDING_BLOCK, dt_proj_bits=8, calibration=True),
    Recipe("int4-mixed", "int4 plus the lm_head in blocks of 16: ~0.1-0.2 more bits per weight for a few % "
                         "lower KL", 4.8, "gptq", embedding_block=EMBEDDING_BLOCK, head_block=16, dt_proj_bits=8,
           calibration=True),
    Recipe("int4-search", "no calibration: per-block scale/zero search (least squares over clipped ranges), "
                          "embedding in blocks of 16, Mamba dt_proj 8-bit", 4.7, "search",
           embedding_block=EMBEDDING_BLOCK, dt_proj_bits=8),
    Recipe("int4-rtn", "min/max round-to-nearest per block, every weight 4-bit (Perch's int4 before GPTQ)",
           4.625, "rtn"),
    Recipe("int8", "min/max round-to-nearest 8-bit per block", 8.625, "rtn", bits=8),
)}


def recipe(name: str) -> Recipe:
    from perch.errors import PerchError

    if name not in RECIPES:
        raise PerchError(f"unknown quantization {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]
