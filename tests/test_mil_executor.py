"""Perch's numpy Core ML executor against torch, on programs made by the real ct.convert (iOS18).

Every package is converted from a tiny torch module with torch.jit.trace (jit.script for the loop),
saved to a temporary .mlpackage and loaded back, so the executor sees what a user's file holds.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import coremltools as ct
import coremltools.optimize.coreml as cto

from perch.errors import PerchError
from perch.runtimes.mil import ops as mil_ops
from perch.runtimes.mil.executor import MilExecutor, MilProgram

D, HEADS, VOCAB, MAX_T = 32, 4, 50, 16
FP16_U = 2.0**-11  # fp16 unit roundoff


def convert(module, example, inputs, path, precision="fp32", outputs=None, states=None):
    """Trace (unless already scripted), convert at iOS18, save to `path`, return the path."""
    module = module.eval()
    traced = module if isinstance(module, torch.jit.ScriptModule) else torch.jit.trace(module, example)
    model = ct.convert(
        traced, inputs=inputs, outputs=outputs, states=states, convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
    )
    model.save(str(path))
    return path


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / max(1.0, np.abs(ref).max()))


# ---- a tiny two-layer transformer --------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, sdpa: bool):
        super().__init__()
        self.sdpa = sdpa
        self.ln = nn.LayerNorm(D)
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.up, self.down = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x, mask):  # x (B, T, D), mask (T, T) additive
        q, k, v = self.qkv(self.ln(x)).unflatten(-1, (3, HEADS, D // HEADS)).permute(2, 0, 3, 1, 4).unbind(0)
        if self.sdpa:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, hd)
        else:
            a = ((q @ k.transpose(-1, -2)) * (D // HEADS) ** -0.5 + mask).softmax(-1) @ v
        x = x + self.o(a.transpose(1, 2).flatten(2))
        h = self.up(x)
        h = F.gelu(h) if self.sdpa else F.gelu(h, approximate="tanh") * torch.sigmoid(h) + F.silu(h)
        return x + self.down(h)


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList([Block(True), Block(False)])
        self.norm_w = nn.Parameter(torch.rand(D) + 0.5)
        self.head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, ids):  # (1, T) int
        t = ids.shape[1]
        mask = torch.full((t, t), -1e4).triu(1)  # finite: fp16-safe causal mask
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, mask)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm_w  # RMS norm
        logits = self.head(x)
        return logits, logits.argmax(-1).to(torch.int32)


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return TinyLM().eval()


@pytest.fixture(scope="module")
def lm_packages(lm, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm")
    ids = ct.TensorType(name="ids", shape=(1, ct.RangeDim(1, MAX_T, 5)), dtype=np.int32)
    outs = [ct.TensorType(name="logits"), ct.TensorType(name="top")]
    example = torch.randint(0, VOCAB, (1, 5))
    return {p: convert(lm, example, [ids], tmp / f"lm_{p}.mlpackage", p, outs) for p in ("fp32", "fp16")}


# fp32: same float32 math as torch, different summation order: ~1e-6. fp16: every op rounds to fp16
# (u = 2^-11); ~40 roundings along the deepest path, mostly uncorrelated -> a few u * sqrt(40) ~ 1e-2.
@pytest.mark.parametrize("precision,bound", [("fp32", 1e-5), ("fp16", 12 * FP16_U)])
def test_transformer_matches_torch(lm, lm_packages, precision, bound):
    ex = MilExecutor(str(lm_packages[precision]))
    assert {"scaled_dot_product_attention", "layer_norm", "linear", "gather"} <= ex.op_types
    rng = np.random.default_rng(1)
    for t in (1, 5, 9):  # inside the RangeDim, not only the traced length
        ids = rng.integers(0, VOCAB, (1, t)).astype(np.int32)
        out = ex.predict({"ids": ids})
        with torch.no_grad():
            ref, _ = lm(torch.from_numpy(ids).long())
        ref = ref.numpy()
        assert out["logits"].shape == ref.shape
        assert out["logits"].dtype == (np.float16 if precision == "fp16" else np.float32)
        err = rel_err(out["logits"], ref)
        assert err < bound, f"{precision} T={t}: relative error {err:.2e} >= {bound:.2e}"
        if precision == "fp32":
            np.testing.assert_array_equal(out["top"], ref.argmax(-1))


def test_fp16_rounding_is_emulated(lm_packages):
    """fp16 compute rounds per op: the result is not the fp32 result rounded once at the end."""
    ids = np.arange(7, dtype=np.int32)[None] % VOCAB
    y16 = MilExecutor(str(lm_packages["fp16"])).predict({"ids": ids})["logits"]
    y32 = MilExecutor(str(lm_packages["fp32"])).predict({"ids": ids})["logits"]
    assert y16.dtype == np.float16
    assert np.abs(y16.astype(np.float32) - y32.astype(np.float16).astype(np.float32)).max() > 0


# ---- Core ML state: a cache written at a position derived from a RangeDim length ------------------

CACHE = (1, 8, 4)


class Cache(nn.Module):
    """Writes proj(x) into cache[:, past:past+T] where past = len(mask) - T; reads the filled prefix."""

    def __init__(self):
        super().__init__()
        self.register_buffer("cache", torch.zeros(CACHE, dtype=torch.float16))
        self.proj = nn.Linear(4, 4)
        with torch.no_grad():  # small integers: the written values are exact in fp16, on any path
            self.proj.weight.copy_(torch.randint(-3, 4, (4, 4)).float())
            self.proj.bias.copy_(torch.randint(-3, 4, (4,)).float())

    def forward(self, x, mask):  # x (1, T, 4), mask (1, past + T)
        end = mask.shape[1]
        start = end - x.shape[1]
        self.cache[:, start:end] = self.proj(x).half()
        kept = self.cache[:, :end].float()  # (1, past + T, 4)
        return (kept * mask.unsqueeze(-1)).sum(1)


@pytest.fixture(scope="module")
def cache_package(tmp_path_factory):
    torch.manual_seed(0)
    module = Cache().eval()
    x, mask = torch.ones(1, 2, 4), torch.ones(1, 3)
    inputs = [ct.TensorType(name="x", shape=(1, ct.RangeDim(1, 8, 2), 4), dtype=np.float32),
              ct.TensorType(name="mask", shape=(1, ct.RangeDim(1, 8, 3)), dtype=np.float32)]
    states = [ct.StateType(wrapped_type=ct.TensorType(shape=CACHE, dtype=np.float16), name="cache")]
    path = tmp_path_factory.mktemp("cache") / "cache.mlpackage"
    with torch.no_grad():
        convert(module, (x, mask), inputs, path, outputs=[ct.TensorType(name="y")], states=states)
    module.cache.zero_()  # tracing ran forward once and wrote into the buffer
    return module, path


def test_state_evolves_like_torch(cache_package):
    module, path = cache_package
    ex = MilExecutor(path)
    assert {"read_state", "coreml_update_state", "slice_update"} <= ex.op_types
    state = ex.make_state()
    assert state["cache"].dtype == np.float16 and state["cache"].shape == CACHE
    rng = np.random.default_rng(0)
    past = 0
    for t in (3, 1, 2, 1):  # prefill, then decode steps and a chunk, all on one state
        x = rng.integers(-4, 5, (1, t, 4)).astype(np.float32)
        mask = np.ones((1, past + t), np.float32)
        out = ex.predict({"x": x, "mask": mask}, state)
        with torch.no_grad():
            ref = module(torch.from_numpy(x), torch.from_numpy(mask)).numpy()
        np.testing.assert_array_equal(state["cache"], module.cache.numpy())
        np.testing.assert_allclose(out["y"], ref, rtol=1e-6)
        past += t
    assert np.any(state["cache"][:, past - 1] != 0) and not np.any(state["cache"][:, past:])


def test_state_is_checked(cache_package):
    ex = MilExecutor(cache_package[1])
    inputs = {"x": np.ones((1, 1, 4), np.float32), "mask": np.ones((1, 1), np.float32)}
    with pytest.raises(PerchError, match="state 'cache'"):
        ex.predict(inputs, {"cache": np.zeros((1, 4, 4), np.float16)})
    with pytest.raises(PerchError, match="state 'cache'"):
        ex.predict(inputs, {})


# ---- compressed weights: constexpr dequantization, evaluated once at load -------------------------


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        return self.fc2(F.silu(self.fc1(x)))


def compress(model, kind):
    q = lambda op: cto.OptimizationConfig(global_config=op)  # noqa: E731
    if kind == "int8_per_channel":
        cfg = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                          weight_threshold=1024)
        return cto.linear_quantize_weights(model, q(cfg))
    if kind == "int4_per_block32":
        cfg = cto.OpLinearQuantizerConfig(mode="linear", dtype="int4", granularity="per_block", block_size=32,
                                          weight_threshold=1024)
        return cto.linear_quantize_weights(model, q(cfg))
    if kind == "palette4_kmeans":  # Perch's own k-means LUT (palettize4's), per tensor; no scikit-learn needed
        from perch.exporter.coreml_compress import kmeans_lut

        return cto.palettize_weights(model, q(cto.OpPalettizerConfig(mode="custom", lut_function=kmeans_lut,
                                                                     weight_threshold=1024)))
    cfg = cto.OpPalettizerConfig(mode="uniform", nbits=4, granularity="per_grouped_channel", group_size=16,
                                 weight_threshold=1024)
    return cto.palettize_weights(model, q(cfg))


def assert_matches_dequantized_torch(ex, module):
    """Executor vs the torch MLP holding coremltools' own decompression of each linear weight."""
    assert not any(t.startswith("constexpr_") for t in ex.per_call_ops)  # dequantized once, at load
    fn = ex.program.function("main")
    linears = [op for op in fn.operations if op.op_type == "linear"]
    ref_module = MLP().eval()
    ref_module.load_state_dict(module.state_dict())
    with torch.no_grad():
        for layer, op in zip((ref_module.fc1, ref_module.fc2), linears):
            producer = op.inputs["weight"].op
            assert producer.op_type.startswith("constexpr_")
            w = np.asarray(producer.materialized_val_inference(), np.float32)
            np.testing.assert_array_equal(ex.constant(op.inputs["weight"].name), w)
            assert 0 < np.abs(w - layer.weight.numpy()).max() < 0.1 * np.abs(w).max()  # compressed, close
            layer.weight.copy_(torch.from_numpy(w))
    x = np.random.default_rng(0).standard_normal((1, 3, 64)).astype(np.float32)
    with torch.no_grad():
        ref = ref_module(torch.from_numpy(x)).numpy()
    assert rel_err(ex.predict({"x": x})["y"], ref) < 1e-5


@pytest.fixture(scope="module")
def mlp_model():
    torch.manual_seed(0)
    module = MLP().eval()
    traced = torch.jit.trace(module, torch.randn(1, 3, 64))
    inputs = [ct.TensorType(name="x", shape=(1, ct.RangeDim(1, MAX_T, 3), 64), dtype=np.float32)]
    model = ct.convert(traced, inputs=inputs, outputs=[ct.TensorType(name="y")], convert_to="mlprogram",
                       minimum_deployment_target=ct.target.iOS18, compute_precision=ct.precision.FLOAT32)
    return module, model


COMPRESSIONS = ["int8_per_channel", "int4_per_block32", "palette4_kmeans", "palette4_uniform_grouped"]


@pytest.mark.parametrize("kind", COMPRESSIONS)
def test_compressed_weights_match_dequantized_torch(mlp_model, kind, tmp_path):
    module, model = mlp_model
    path = tmp_path / f"{kind}.mlpackage"
    compress(model, kind).save(str(path))
    ex = MilExecutor(path)
    constexprs = {t for t in ex.op_types if t.startswith("constexpr_")}
    palette = kind.startswith("palette")
    assert constexprs == {"constexpr_lut_to_dense" if palette else "constexpr_blockwise_shift_scale"}
    assert_matches_dequantized_torch(ex, module)



def test_ios16_affine_dequantize(tmp_path):
    torch.manual_seed(0)
    module = MLP().eval()
    inputs = [ct.TensorType(name="x", shape=(1, 3, 64), dtype=np.float32)]
    traced = torch.jit.trace(module, torch.randn(1, 3, 64))
    model = ct.convert(traced, inputs=inputs, outputs=[ct.TensorType(name="y")], convert_to="mlprogram",
                       minimum_deployment_target=ct.target.iOS16, compute_precision=ct.precision.FLOAT32)
    cfg = cto.OpLinearQuantizerConfig(mode="linear", dtype="uint8", weight_threshold=1024)
    cto.linear_quantize_weights(model, cto.OptimizationConfig(global_config=cfg)).save(str(tmp_path / "q.mlpackage"))
    ex = MilExecutor(tmp_path / "q.mlpackage")
    assert "constexpr_affine_dequantize" in ex.op_types
    assert_matches_dequantized_torch(ex, module)

# ---- bad packages and bad inputs: PerchError naming the problem -----------------------------------


def test_not_a_package(tmp_path):
    with pytest.raises(PerchError, match="does not exist"):
        MilExecutor(tmp_path / "missing.mlpackage")
    (tmp_path / "model.mlmodel").write_bytes(b"")
    with pytest.raises(PerchError, match="not a .mlpackage"):
        MilExecutor(tmp_path / "model.mlmodel")


def test_neural_network_model_is_rejected(tmp_path):
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder

    builder = NeuralNetworkBuilder([("x", datatypes.Array(4))], [("y", datatypes.Array(4))])
    builder.add_activation("relu", "RELU", "x", "y")
    ct.models.MLModel(builder.spec, skip_model_load=True).save(str(tmp_path / "nn.mlpackage"))
    with pytest.raises(PerchError, match="'neuralNetwork' Core ML model, not an ML program"):
        MilExecutor(tmp_path / "nn.mlpackage")


def test_missing_weights_file(mlp_model, tmp_path):
    path = tmp_path / "mlp.mlpackage"
    mlp_model[1].save(str(path))
    (path / "Data/com.apple.CoreML/weights/weight.bin").unlink()
    with pytest.raises(PerchError, match=r"weight\.bin .*missing"):
        MilExecutor(path)


def test_unknown_ops_are_listed_at_load(lm_packages, monkeypatch):
    monkeypatch.delitem(mil_ops.OPS, "gelu")
    message = r"Core ML op 'gelu' \(in function main\) is not supported by Perch's executor"
    with pytest.raises(PerchError, match=message):
        MilExecutor(lm_packages["fp32"])
    monkeypatch.delitem(mil_ops.OPS, "layer_norm")
    with pytest.raises(PerchError, match=r"Core ML ops 'gelu', 'layer_norm' \(in function main\) are not supported"):
        MilExecutor(lm_packages["fp32"])


def test_inputs_are_checked(lm_packages):
    ex = MilExecutor(lm_packages["fp32"])
    ok = np.zeros((1, 4), np.int32)
    cases = [
        ({"ids": np.zeros((1, MAX_T + 1), np.int32)}, r"input 'ids': expected shape \(1, 1\.\.16\), got \(1, 17\)"),
        ({"ids": np.zeros((2, 4), np.int32)}, r"input 'ids': expected shape \(1, 1\.\.16\), got \(2, 4\)"),
        ({"ids": np.zeros((4,), np.int32)}, r"input 'ids': expected shape .* got \(4,\)"),
        ({"ids": ok.astype(np.float32)}, r"input 'ids': expected dtype int32, got float32"),
        ({"ids": ok, "extra": ok}, r"unexpected \['extra'\]"),
        ({}, r"missing \['ids'\]"),
    ]
    for inputs, message in cases:
        with pytest.raises(PerchError, match=message):
            ex.predict(inputs)
    assert ex.predict({"ids": ok.astype(np.int64)})["logits"].shape == (1, 4, VOCAB)  # ints are cast


# ---- multifunction packages ----------------------------------------------------------------------


def test_multifunction_package(lm, lm_packages, cache_package, tmp_path):
    desc = ct.utils.MultiFunctionDescriptor()
    desc.add_function(str(lm_packages["fp32"]), src_function_name="main", target_function_name="lm")
    desc.add_function(str(cache_package[1]), src_function_name="main", target_function_name="cache")
    desc.default_function_name = "cache"
    path = tmp_path / "multi.mlpackage"
    ct.utils.save_multifunction(desc, str(path))

    program = MilProgram.load(path)
    assert sorted(program.function_names) == ["cache", "lm"]
    assert MilExecutor(program).function_name == "cache"  # the package's default function
    ids = np.arange(6, dtype=np.int32)[None]
    with torch.no_grad():
        ref = lm(torch.from_numpy(ids).long())[0].numpy()
    assert rel_err(MilExecutor(program, "lm").predict({"ids": ids})["logits"], ref) < 1e-5
    cache = MilExecutor(program, "cache")
    state = cache.make_state()
    y = cache.predict({"x": np.ones((1, 2, 4), np.float32), "mask": np.ones((1, 2), np.float32)}, state)["y"]
    assert y.shape == (1, 4) and np.any(state["cache"][:, :2] != 0) and not np.any(state["cache"][:, 2:])
    with pytest.raises(PerchError, match="has no function 'main'; its functions are: .*lm"):
        MilExecutor(program, "main")
