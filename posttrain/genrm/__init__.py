"""GenRM: circular pairwise judging, reward-model training, the RLHF stage (issue: GenRM)."""
