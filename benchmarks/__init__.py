"""Time and peak memory of our models beside their peers, one module per suite over one harness.

    harness.py          the Suite interface; a fresh worker process per cell; Meter (peak RSS or CUDA peak,
                        timings); --json written as cells finish; the table
    suite_unet.py       --suite unet: our UNet vs diffusers' UNet2DConditionModel with the same weights
    suite_dreambooth.py --suite dreambooth: our DreamBooth training step in its memory-saving variants
    cli.py              the flags, the registry of suites (SUITES) and main(); scripts/benchmark.py runs it

A new suite is a class with the ``harness.Suite`` methods, added to ``cli.SUITES``.
"""
