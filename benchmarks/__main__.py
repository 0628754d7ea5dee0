"""``python -m benchmarks``: the same as ``scripts/benchmark.py``; the harness starts its workers this way."""
import sys

from benchmarks.cli import main

sys.exit(main())
