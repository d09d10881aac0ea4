#!/usr/bin/env python3
"""Write random Hugging Face checkpoints: a tiny one of a family, or an upcycled pair.

    python tools/make_checkpoint.py mixtral /tmp/tiny-mixtral --layers 2 --dim 64
    python tools/make_checkpoint.py --upcycle mixtral-8x7b /data/pair --alpha 0.7
    python tools/make_checkpoint.py --upcycle qwen3-30b-a3b /data/qwen --sigma 0.02 --layers 8
    python tools/make_checkpoint.py --upcycle mixtral-8x7b /tmp/toy --tiny --sigma 0.1

--upcycle writes OUT/draft and OUT/target (specoff.bench.synthetic.write_upcycled_pair): the
target's attention, norms, embeddings and head are the draft's, its every expert the draft's
feed-forward plus noise σ, the same weights tools/bench.py builds in memory (same seed and
σ), one layer at a time, so peers that load checkpoints from disk run them too. Without
--layers it writes every layer that fits the disk and says how many. --alpha finds σ for
that greedy acceptance first (on the GPU when there is one).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from specoff.config import SUPPORTED_FAMILIES  # noqa: E402
from specoff.bench.synthetic import (PAIRS, TINY_PAIRS, make_tiny_checkpoint, make_tokenizer,  # noqa: E402
                               pair_configs, sigma_for_acceptance, write_upcycled_pair)


def upcycle(args) -> int:
    draft_hf, target_hf, name, _ = PAIRS[args.upcycle]
    if args.tiny:
        draft_hf, target_hf, name = TINY_PAIRS[target_hf["model_type"]]
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} exists and is not empty", file=sys.stderr)
        return 2
    if (args.sigma is None) == (args.alpha is None):
        print("error: --upcycle needs one of --sigma (the noise scale) or --alpha (a greedy "
              "acceptance to find σ for)", file=sys.stderr)
        return 2
    dtype = torch.float32 if args.tiny else torch.bfloat16
    sigma = args.sigma
    if sigma is None:
        draft_cfg, target_cfg = pair_configs(draft_hf, target_hf, args.layers)
        sigma, alpha = sigma_for_acceptance(args.alpha, draft_cfg, target_cfg, seed=args.seed,
                                            dtype=dtype if args.tiny else None)
        print(f"σ = {sigma:.5g} gives a greedy acceptance of {alpha:.3f}")
    tokenizer = make_tokenizer()
    if tokenizer is not None and len(tokenizer) > target_hf["vocab_size"]:
        tokenizer = None
    try:
        draft, target, layers = write_upcycled_pair(
            out, draft_hf, target_hf, sigma, layers=args.layers, seed=args.seed, dtype=dtype,
            tokenizer=tokenizer, progress=None if args.quiet else lambda s: print(f"  {s}"))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    full = target_hf["num_hidden_layers"]
    note = "" if layers == full else f" ({layers} of {full} layers: what the disk holds)"
    print(f"wrote the {name} pair at σ = {sigma:.5g}, seed {args.seed}{note}: "
          f"draft {draft}, target {target}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("family", nargs="?", choices=SUPPORTED_FAMILIES,
                   help="a tiny checkpoint of this family (not with --upcycle)")
    p.add_argument("out", help="folder to write (must not exist or be empty)")
    p.add_argument("--upcycle", choices=list(PAIRS), help="write this upcycled pair instead")
    p.add_argument("--sigma", type=float, help="--upcycle: the experts' noise scale")
    p.add_argument("--alpha", type=float, help="--upcycle: find σ for this greedy acceptance")
    p.add_argument("--tiny", action="store_true", help="--upcycle: a toy pair of the same families")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, help="decoder layers (default: 2; --upcycle: all that fit)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=128)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tie", action="store_true", help="tie the output head to the embeddings")
    p.add_argument("--max-shard-size", help="e.g. 100KB, to write a sharded checkpoint")
    args = p.parse_args(argv)
    if args.upcycle:
        if args.family:
            p.error("give a family or --upcycle, not both")
        return upcycle(args)
    if not args.family:
        p.error("give a family (or --upcycle PAIR)")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} exists and is not empty", file=sys.stderr)
        return 2
    make_tiny_checkpoint(args.family, out, seed=args.seed, max_shard_size=args.max_shard_size,
                         dim=args.dim, layers=args.layers or 2, heads=args.heads,
                         kv_heads=args.kv_heads, intermediate=args.intermediate,
                         experts=args.experts, top_k=args.top_k, tie=args.tie)
    print(f"wrote a {args.family} checkpoint to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
