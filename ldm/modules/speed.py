"""``model.params.compile``: torch.compile of the UNet, or eager mode with one line saying why not.

torch.compile's default backend (inductor) writes and compiles C++ (CPU) or Triton (CUDA) kernels; without a C++
compiler, or without Triton on a GPU, it fails at the first call, deep inside a training step. A tiny function is
compiled first on the run's device: if that fails, the run says so and stays in eager mode. ``nn.Module.compile``
compiles in place, so the checkpoint keys keep their names (``torch.compile(module)`` would prefix them with
``_orig_mod.``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def _probe(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x) * 2 + 1


def compiler_problem(device: torch.device) -> Optional[str]:
    """None when torch.compile's default backend runs on ``device``, else the first line of its error."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    try:
        torch.compile(_probe)(torch.ones(8, device=device))
    except Exception as e:  # noqa: BLE001 - any failure means: do not compile
        lines = [line for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        return f"{type(e).__name__}: {lines[0][:200]}"
    return None


def compile_or_eager(module: nn.Module, device: torch.device) -> bool:
    """Compile ``module`` in place when the compiler runs on ``device``; True if it did."""
    problem = compiler_problem(torch.device(device))
    if problem:
        print(f"model.params.compile: torch.compile cannot run here ({problem}); training the UNet in eager mode")
        return False
    # A graph the compiler cannot handle later (an op it lacks) then runs eagerly instead of ending the run.
    torch._dynamo.config.suppress_errors = True
    if torch.device(device).type == "cpu":
        # Inductor's layout optimisation turns the convolutions channels-last; the CPU's convolution backward is
        # slower that way (a full v1 UNet training step on 2 cores: 11.3 s with it, 8.0 s without; eager 8.8 s).
        from torch._inductor import config as inductor_config
        inductor_config.layout_optimization = False
    module.compile()
    print("model.params.compile: the UNet is compiled (the first steps include the compilation)")
    return True
