"""A small arithmetic reasoning dataset on disk for SFT tests."""

from __future__ import annotations

import json

import pytest

from posttrain.sft.arith import generate


@pytest.fixture(scope="session")
def arith_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "arith.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in generate(64, seed=3)))
    return path
