"""SFT stage: reasoning-budget data, exact packing, long-context training (issue: SFT)."""
