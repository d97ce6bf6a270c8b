"""Loading checkpoints: a local directory or the local Hugging Face cache, LoRA merged, bitsandbytes dequantized."""
from perch.loading.checkpoint import Checkpoint, build_hf_model, load_checkpoint

__all__ = ["Checkpoint", "build_hf_model", "load_checkpoint"]
