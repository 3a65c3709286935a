"""Configuration of the training pieces SFT and RL share (imports without torch)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from posttrain.config import Config


MixedPrecision = Annotated[Literal["none", "bf16"], Field(description=(
    "bf16: forward passes run under torch.autocast in bfloat16 (weights, gradients and AdamW state stay in "
    "the weights' dtype; the LM head and log-softmax in fp32): 1.7x faster on CPUs with AMX or AVX512-BF16. "
    "No effect on bf16 weights (CUDA's default)"))]


class LoraConfig(Config):
    enabled: bool = Field(False, description="train a LoRA adapter (peft) instead of all weights")
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["auto", "all-linear"] = Field("auto", description=(
        "auto = all-linear, except NemotronH: q,k,v,o_proj, in_proj, up_proj, down_proj "
        "(all-linear fails on its conv1d/out_proj)"))


class FsdpConfig(Config):
    enabled: bool = Field(False, description=(
        "shard parameters, gradients and AdamW state over the data-parallel ranks (FSDP2 fully_shard per "
        "decoder block, then the root); checkpoints become torch.distributed.checkpoint folders"))
    reshard_after_forward: bool = Field(True, description=(
        "free each block's gathered parameters after its forward (gather again in backward): less memory, "
        "one more all-gather per block"))
    cpu_offload: bool = Field(False, description="keep sharded parameters, gradients and optimizer state in host memory (GPU)")
