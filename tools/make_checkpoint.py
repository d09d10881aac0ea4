#!/usr/bin/env python3
"""Write a tiny random Hugging Face checkpoint (config, safetensors, tokenizer) of a family.

    python tools/make_checkpoint.py mixtral /tmp/tiny-mixtral --layers 2 --dim 64
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from specoff.config import SUPPORTED_FAMILIES  # noqa: E402
from specoff.synthetic import make_tiny_checkpoint  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("family", choices=SUPPORTED_FAMILIES)
    p.add_argument("out", help="folder to write (must not exist or be empty)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=128)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tie", action="store_true", help="tie the output head to the embeddings")
    p.add_argument("--max-shard-size", help="e.g. 100KB, to write a sharded checkpoint")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} exists and is not empty", file=sys.stderr)
        return 2
    make_tiny_checkpoint(args.family, out, seed=args.seed, max_shard_size=args.max_shard_size,
                         dim=args.dim, layers=args.layers, heads=args.heads,
                         kv_heads=args.kv_heads, intermediate=args.intermediate,
                         experts=args.experts, top_k=args.top_k, tie=args.tie)
    print(f"wrote a {args.family} checkpoint to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
