"""Training pieces shared by the SFT and RL stages: chunked cross-entropy, checkpoints."""
