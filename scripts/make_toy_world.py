#!/usr/bin/env python
"""Draw the toy world (ldm/data/toy_world.py): captioned 64x64 scenes for pretraining a tiny latent diffusion model.

    python scripts/make_toy_world.py --out data/toy_world --count 12000 --seed 2
    python scripts/make_toy_world.py --out data/world5 --places beach moon snow grass city   # the first world

writes OUT/images/NNNNNN.png, OUT/captions.jsonl (file, caption, kind, colour, size, background, bbox, ...) and
OUT/manifest.json (seed, count, places, held-out pairs, data_hash). The same seed gives the same pixels and hash.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.data.toy_world import BACKGROUNDS, write_world  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write (created if missing)")
    parser.add_argument("--count", type=int, default=12000,
                        help="number of scenes (default: the shipped model's world)")
    parser.add_argument("--seed", type=int, default=2, help="the world's seed: same seed, same pixels")
    parser.add_argument("--places", nargs="+", choices=BACKGROUNDS, default=list(BACKGROUNDS),
                        help="the places scenes stand in (default: all six)")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    start = time.perf_counter()
    manifest = write_world(args.out, count=args.count, seed=args.seed, places=tuple(args.places))
    print(f"wrote {args.count} scenes to {args.out} in {time.perf_counter() - start:.1f} s; "
          f"data_hash {manifest['data_hash']}")


if __name__ == "__main__":
    main()
