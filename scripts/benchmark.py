#!/usr/bin/env python
"""Time and peak memory of our models beside diffusers' (``--suite unet``) or across the DreamBooth step's
memory-saving variants (``--suite dreambooth``): the command line of the ``benchmarks`` package.

    python scripts/benchmark.py --config v1 --latent 32 --batch 1 --repeat 1 --warmup 1 --steps 2 --markdown
    python scripts/benchmark.py --suite dreambooth --config v1 --size 512 --repeat 1 --warmup 1 --markdown

``--help`` lists the flags (``--suite dreambooth --help`` that suite's); benchmarks/cli.py has more examples.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
