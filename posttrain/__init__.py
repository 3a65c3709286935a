"""posttrain: open post-training pipeline (SFT -> RLVR -> GenRM RLHF) on Ray, vLLM and HF."""

__version__ = "0.1.0"
