"""Time and peak memory of our models beside their peers, one module per suite over one harness.

    harness.py          the Suite interface; a fresh worker process per cell; Meter (peak RSS or CUDA peak,
                        timings); --json written as cells finish; the table
    suite_unet.py       --suite unet: our UNet (SD v1, SDXL) vs diffusers' UNet2DConditionModel, same weights
    suite_dreambooth.py --suite dreambooth: our DreamBooth training step in its memory-saving and lean variants
    peer_dreambooth.py  --peer diffusers: diffusers' train_dreambooth.py step, written out, on our weights
    profile.py          --profile N: the slowest backward nodes of a training step, two implementations side by side
    cli.py              the flags, the registry of suites (SUITES) and main(); scripts/benchmark.py runs it

A new suite is a class with the ``harness.Suite`` methods, added to ``cli.SUITES``.
"""
