"""A stateful front-end cut into pieces: embedding, one piece per decoder layer, and the head.

Why: coremltools holds a whole program, with numpy copies of every weight, while it converts; a 7B model
does not fit in 24 GiB that way (docs/traps.md, Core ML). Converted one piece at a time, only one layer's
weights are ever in memory; exporter/coreml_pieces.py then joins the pieces into one program.

Each piece is a small module whose weights sit at the same paths as in the one-piece stateful module
(`core.transformer.h.3...`), so traced constants keep the one-piece names (quantization recipes match on
them), and it runs the same step functions as the one-piece forward, so the joined program computes the
same thing. Pieces pass "carries" (the hidden state, and for Falcon the rotary tables and the mask) from one
to the next; states are the layer-stacked buffers of the stateful module, each layer writing its own slice.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class Carry:
    """A tensor passed between pieces; `shape` uses the I/O spec's axis names."""

    name: str
    shape: tuple


@dataclass
class Piece:
    """One piece: `module(*inputs) -> outputs`. Inputs and outputs are carry names or the stateful front-end's
    own input names ("input_ids", "causal_mask") and "logits"; `states` are the state buffers it reads and writes."""

    name: str
    module: nn.Module
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    states: tuple[str, ...] = ()
    # A weight this piece shares with an earlier one (a head tied to the embedding): its const name ->
    # (the owning piece's index, the owner's const name). Joined, the owner's copy serves both.
    ties: dict = field(default_factory=dict)


def _attach(root: nn.Module, path: str, mod: nn.Module) -> None:
    """Put `mod` at dotted `path` under `root`, creating empty parents: traced names follow the path."""
    *parents, leaf = path.split(".")
    node = root
    for p in parents:
        if not hasattr(node, p):
            node.add_module(p, nn.Module())
        node = getattr(node, p)
    node.add_module(leaf, mod)


def _tied(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _head_ties(head: nn.Linear, embedding: nn.Embedding, head_path: str, embedding_path: str) -> dict:
    if not _tied(head.weight, embedding.weight):
        return {}
    return {head_path.replace(".", "_") + "_weight": (0, embedding_path.replace(".", "_") + "_weight")}


def _shell(cls, modules: dict[str, nn.Module], buffers: dict[str, torch.Tensor]) -> nn.Module:
    root = cls()
    for path, mod in modules.items():
        _attach(root, path, mod)
    for path, buf in buffers.items():
        *parents, leaf = path.split(".")
        node = root
        for p in parents:
            node = getattr(node, p)
        node.register_buffer(leaf, buf, persistent=False)
    return root.eval()


# ---- Falcon: embed -> (x, cos, sin, mask); layer i: (x, cos, sin, mask) -> x; head: x -> logits
class FalconEmbedPiece(nn.Module):
    extra_mask_columns = 0

    def forward(self, input_ids, causal_mask):
        from perch.archs.falcon import embed, stateful_positions

        positions, mask = stateful_positions(input_ids, causal_mask, self.extra_mask_columns)
        x, cos, sin = embed(self.core, input_ids, positions)
        return x, cos, sin, mask.to(x.dtype)


class FalconLayerPiece(nn.Module):
    index = 0
    names: dict = {}

    def forward(self, x, cos, sin, mask):
        from perch.archs.falcon import cache_attend, layer_step

        end = mask.shape[-1]
        kc, vc = getattr(self, self.names["key"]), getattr(self, self.names["value"])
        attend = cache_attend(kc, vc, end - x.shape[1], end)
        return layer_step(getattr(self.core.transformer.h, str(self.index)), self.index, x, cos, sin, mask, attend)


class FalconHeadPiece(nn.Module):
    def forward(self, x):
        from perch.archs.falcon import head

        return head(self.core, x)


def falcon_pieces(stateful: nn.Module) -> tuple[list[Piece], dict[str, Carry]]:
    core, names = stateful.core, stateful.names
    c = core.config
    hd = c.hidden_size // c.num_attention_heads
    carries = {"hidden": Carry("hidden", ("batch", "sequence", c.hidden_size)),
               "cos": Carry("cos", ("batch", 1, "sequence", hd)), "sin": Carry("sin", ("batch", 1, "sequence", hd)),
               "mask": Carry("mask", ("batch", 1, "sequence", "total_sequence"))}
    emb = _shell(FalconEmbedPiece, {"core.transformer.word_embeddings": core.transformer.word_embeddings},
                 {"core.rope_cos": core.rope_cos, "core.rope_sin": core.rope_sin})
    emb.extra_mask_columns = stateful.extra_mask_columns
    pieces = [Piece("embed", emb, ("input_ids", "causal_mask"), ("hidden", "cos", "sin", "mask"))]
    states = (names["key"], names["value"])
    for i, layer in enumerate(core.transformer.h):
        mod = _shell(FalconLayerPiece, {f"core.transformer.h.{i}": layer}, {})
        for n in states:
            mod.register_buffer(n, getattr(stateful, n))
        mod.index, mod.names = i, names
        pieces.append(Piece(f"layer{i}", mod, ("hidden", "cos", "sin", "mask"), ("hidden",), states))
    tail = _shell(FalconHeadPiece, {"core.transformer.ln_f": core.transformer.ln_f, "core.lm_head": core.lm_head}, {})
    ties = _head_ties(core.lm_head, core.transformer.word_embeddings, "core.lm_head", "core.transformer.word_embeddings")
    pieces.append(Piece("head", tail, ("hidden",), ("logits",), ties=ties))
    return pieces, carries


# ---- Falcon-Mamba: embed -> x; layer i: x -> x (its conv and SSM state slices); head: x -> logits
class MambaEmbedPiece(nn.Module):
    def forward(self, input_ids):
        return self.core.backbone.embeddings(input_ids)


class MambaLayerPiece(nn.Module):
    index = 0
    names: dict = {}
    scan, rounds = "logdepth", 1

    def forward(self, x):
        from perch.archs.falcon_mamba import stateful_step

        block = getattr(self.core.backbone.layers, str(self.index))
        conv, ssm = getattr(self, self.names["conv"]), getattr(self, self.names["ssm"])
        return stateful_step(block, self.index, x, conv, ssm, self.scan, self.rounds)


class MambaHeadPiece(nn.Module):
    def forward(self, x):
        return self.core.lm_head(self.core.backbone.norm_f(x)).float()


def falcon_mamba_pieces(stateful: nn.Module) -> tuple[list[Piece], dict[str, Carry]]:
    core, names = stateful.core, stateful.names
    carries = {"hidden": Carry("hidden", ("batch", "sequence", core.config.hidden_size))}
    emb = _shell(MambaEmbedPiece, {"core.backbone.embeddings": core.backbone.embeddings}, {})
    pieces = [Piece("embed", emb, ("input_ids",), ("hidden",))]
    states = (names["conv"], names["ssm"])
    for i, block in enumerate(core.backbone.layers):
        mod = _shell(MambaLayerPiece, {f"core.backbone.layers.{i}": block}, {})
        for n in states:
            mod.register_buffer(n, getattr(stateful, n))
        mod.index, mod.names, mod.scan, mod.rounds = i, names, core.scan, core.rounds
        pieces.append(Piece(f"layer{i}", mod, ("hidden",), ("hidden",), states))
    tail = _shell(MambaHeadPiece, {"core.backbone.norm_f": core.backbone.norm_f, "core.lm_head": core.lm_head}, {})
    ties = _head_ties(core.lm_head, core.backbone.embeddings, "core.lm_head", "core.backbone.embeddings")
    pieces.append(Piece("head", tail, ("hidden",), ("logits",), ties=ties))
    return pieces, carries


# Architecture name -> its pieces; an architecture missing here converts in one piece only.
PIECES = {"falcon": falcon_pieces, "falcon_mamba": falcon_mamba_pieces}
