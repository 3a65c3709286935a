"""Verifiable environments: protocol, registry, built-ins, mixing (issue: Environments)."""
