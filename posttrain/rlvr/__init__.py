"""RLVR stage: GRPO controller loop, trainer actor, policy loss, advantages (issue: RLVR)."""
