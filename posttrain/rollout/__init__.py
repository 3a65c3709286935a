"""Rollout: generation engines (vLLM | transformers), thinking budget, weight sync."""
