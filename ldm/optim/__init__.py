"""How trained weights are updated: AdamW, 8-bit AdamW or DeepSpeed's CPU Adam from ``optimizer_config`` and the
learning-rate schedule (``build``, ``lr_scheduler``), the per-tensor optimizer that updates during backward (fused
backward, bf16-stored weights; ``per_tensor``) and stochastic rounding (``rounding``). Plain torch: imports only
the core helpers.
"""
