"""Data-parallel plumbing of the policy trainer that is RL's own: the rendezvous address, row shards.

W trainer workers each train a token-balanced share of every (mini)batch and sum their
gradients before clipping and the optimizer step, so all W make the update one worker would
make on the whole batch (up to float summation order). The process group, the device mesh, the
gradient sums and FSDP are SFT's too: ``posttrain/training/parallel.py``.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence


def rendezvous_address() -> str:
    """``tcp://IP:PORT``: a free port on this node, where rank 0 will listen for the others."""
    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return f"tcp://{ray.util.get_node_ip_address()}:{port}"


def shard_rows(rows: Sequence[int], lengths: Sequence[int], size: int) -> list[list[int]]:
    """``rows`` split into ``size`` shards of about equal tokens (``lengths[row]``): longest row
    first onto the lightest shard, ties to the lower rank. Depends only on its arguments, so every
    rank computes the same split; a shard may be empty when there are fewer rows than workers."""
    if size == 1:
        return [list(rows)]
    shards: list[list[int]] = [[] for _ in range(size)]
    load = [0] * size
    for row in sorted(rows, key=lambda r: (-lengths[r], r)):
        k = min(range(size), key=lambda i: (load[i], i))
        shards[k].append(row)
        load[k] += lengths[row]
    return [sorted(s) for s in shards]
