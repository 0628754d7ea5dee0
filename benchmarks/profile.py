"""``--profile N``: where a training step's backward pass spends its time, per autograd node, for two
implementations side by side.

torch.profiler records one step (after the timed ones, so warm-up and caches are done). Every backward node the
autograd engine runs appears as ``autograd::engine::evaluate_function: <Node>`` (``ConvolutionBackward0``,
``NativeGroupNormBackward0``, ...) with the time of the kernels it launched; summed per node type they say which
kinds of layers a slower backward loses its time in. CUDA: kernel time on the device; CPU: wall time of the ops.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

NODE_PREFIX = "autograd::engine::evaluate_function: "


def backward_profile(step: Callable[[], Any], device: str, top: int) -> dict[str, Any]:
    """Run ``step`` once under the profiler; the ``top`` backward node types by total time, and the backward
    total, as ``{"backward_ms": float, "ops": [[node, calls, ms], ...]}``."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device == "cuda":
            torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        if not event.key.startswith(NODE_PREFIX):
            continue
        # evaluate_function events nest the op's kernels: their total (not self) time is the node's cost.
        us = getattr(event, "device_time_total", 0) if device == "cuda" else event.cpu_time_total
        rows.append([event.key[len(NODE_PREFIX):], int(event.count), us / 1000])
    rows.sort(key=lambda r: -r[2])
    return {"backward_ms": sum(r[2] for r in rows), "ops": rows[:top]}


def format_profiles(titles: Sequence[str], profiles: Sequence[dict[str, Any]]) -> str:
    """Two (or more) profiles as columns: rank, then per implementation ``node  calls  ms  %``."""
    width = max([44] + [len(op[0]) for p in profiles for op in p["ops"]])  # whole node names, however long
    cell = width + 25  # "name calls ms %" below; columns joined by two spaces
    header = "  ".join(f"{t[:width]:<{cell}}" for t in titles)
    lines = ["Backward per autograd node (one profiled step; % of that step's backward; with gradient checkpointing "
             "a node's time includes the forward recomputation it triggered):", "    " + header]
    depth = max(len(p["ops"]) for p in profiles)
    for i in range(depth):
        cells = []
        for p in profiles:
            if i < len(p["ops"]):
                name, calls, ms = p["ops"][i]
                share = 100 * ms / p["backward_ms"] if p["backward_ms"] else 0
                cells.append(f"{name[:width]:<{width}} {calls:>5} {ms:>9.2f} ms {share:4.0f}%")
            else:
                cells.append(" " * cell)
        lines.append(f"{i + 1:>2}. " + "  ".join(cells))
    lines.append("    " + "  ".join(f"{'backward total':<{width}} {'':>5} {p['backward_ms']:>9.2f} ms {'':5}"
                                      for p in profiles))
    return "\n".join(line.rstrip() for line in lines)
