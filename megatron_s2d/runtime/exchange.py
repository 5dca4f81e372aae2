"""Point-to-point exchange of Python objects (tensors included) between arbitrary ranks, in one collective.

Used where two layouts meet: the stage's data-parallel ranks hand rows to the frozen teacher's replicas and get the
scores back (``policy.scorer``). Every rank calls :func:`exchange` with what it sends to whom; one ``all_to_all`` of
the sizes, one ``all_to_all_single`` of the pickled payloads (each pair of ranks moves only its own bytes; gloo and
nccl both serve it). Objects are pickled (tensors by value), an object sent to several ranks once.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch
import torch.distributed as dist

from megatron_s2d.runtime.dist import comm_device


def exchange(send: dict[int, Any], group=None) -> dict[int, Any]:
    """Send ``send[dst]`` to each global rank ``dst``; return ``{src: obj}`` for every rank that sent to this one.

    Collective over ``group`` (default: the world); every member must call it, possibly with an empty ``send``.
    """
    world = dist.get_world_size(group)
    members = [dist.get_global_rank(group, i) for i in range(world)] if group is not None else list(range(world))
    index = {r: i for i, r in enumerate(members)}
    unknown = sorted(set(send) - set(index))
    if unknown:
        raise ValueError(f"exchange: destination ranks {unknown} are not in the group {members}")
    blobs = [b""] * world
    pickled: dict[int, bytes] = {}  # one object sent to several ranks is pickled once
    for dst, obj in send.items():
        if id(obj) not in pickled:
            pickled[id(obj)] = pickle.dumps(obj, protocol=5)
        blobs[index[dst]] = pickled[id(obj)]
    dev = comm_device()
    in_sizes = torch.tensor([len(b) for b in blobs], dtype=torch.int64, device=dev)
    out_sizes = torch.empty_like(in_sizes)
    dist.all_to_all_single(out_sizes, in_sizes, group=group)
    payload = b"".join(blobs)
    send_buf = (torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload
                else torch.empty(0, dtype=torch.uint8)).to(dev)
    out_sizes_l = out_sizes.tolist()
    recv_buf = torch.empty(int(sum(out_sizes_l)), dtype=torch.uint8, device=dev)
    dist.all_to_all_single(recv_buf, send_buf, output_split_sizes=out_sizes_l,
                           input_split_sizes=in_sizes.tolist(), group=group)
    data = recv_buf.cpu().numpy().tobytes()
    out, offset = {}, 0
    for i, size in enumerate(out_sizes_l):
        if size:
            out[members[i]] = pickle.loads(data[offset:offset + size])
        offset += size
    return out
