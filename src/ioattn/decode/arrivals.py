"""Arrival counters of the fused split combine (kernel.py): one int32 per query tile, counting
the splits that have written their partial results.

The program that merges a tile sets its counter back to 0, so after every call all counters are 0
again and one zeroed buffer serves every later call. Calls on one stream run one after another and
never hold a counter at the same time; calls on two streams could, so each stream has its own
buffer. Under CUDA-graph capture a fresh zeroed buffer goes into the graph instead: a graph may
be replayed on any stream, next to eager calls or other graphs, and its own counters keep it
apart from all of them.
"""
import torch

_BUFFERS: dict[tuple, torch.Tensor] = {}


def arrival_counters(n: int, device: torch.device) -> torch.Tensor:
    """At least ``n`` int32 counters, all 0, for a kernel launched next on the current stream."""
    if device.type != "cuda":
        key = (device.type, device.index)
    elif torch.cuda.is_current_stream_capturing():
        return torch.zeros(n, dtype=torch.int32, device=device)
    else:
        key = (device.type, device.index, torch.cuda.current_stream(device).stream_id)
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < n:
        # The old buffer (all 0 again once its last kernel ends) is freed in stream order.
        buf = _BUFFERS[key] = torch.zeros(max(n, 256), dtype=torch.int32, device=device)
    return buf
