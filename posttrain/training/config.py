"""Configuration of the training pieces SFT and RL share (imports without torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from posttrain.config import Config


class LoraConfig(Config):
    enabled: bool = Field(False, description="train a LoRA adapter (peft) instead of all weights")
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["auto", "all-linear"] = Field("auto", description=(
        "auto = all-linear, except NemotronH: q,k,v,o_proj, in_proj, up_proj, down_proj "
        "(all-linear fails on its conv1d/out_proj)"))
