"""Merge checkpoints (native or HF Bamba directories) tensor by tensor: MergeKit `linear` or `slerp`.

    python scripts/merge.py --config merge.yaml --out merged/ [--out-hf merged-hf/]
    python scripts/merge.py --models runA runB --weights 0.6 0.4 --out merged/
    python scripts/merge.py --models runA runB --method slerp --t 0.3 --out-hf merged-hf/

merge.yaml follows MergeKit:

    models:
      - model: outputs/anneal-constant
        parameters: {weight: 0.5}
      - model: outputs/anneal-cosine
        parameters: {weight: 0.5}
    merge_method: linear        # or slerp (two models, base_model first, parameters: {t: 0.5})
    parameters: {normalize: true}
    dtype: bfloat16

Relative paths in the YAML are relative to its folder. Memory stays at a few tensors.
"""

from __future__ import annotations

import argparse

from hybrid_train.train.export import parse_dtype, parse_size
from hybrid_train.train.merge import MergeSpec, load_merge_config, merge


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="MergeKit-style YAML (instead of --models)")
    parser.add_argument("--models", nargs="+", help="checkpoints / run dirs / HF dirs")
    parser.add_argument("--weights", nargs="+", type=float, help="linear: one per model (default: equal)")
    parser.add_argument("--method", default="linear", choices=["linear", "slerp"])
    parser.add_argument("--t", type=float, default=0.5, help="slerp: 0 gives the first model")
    parser.add_argument("--no-normalize", action="store_true", help="linear: do not divide by the sum of weights")
    parser.add_argument("--dtype", default="auto", help="output dtype: auto (first model's), bf16, fp16, fp32")
    parser.add_argument("--out", help="native checkpoint to write")
    parser.add_argument("--out-hf", help="HF Bamba directory to write")
    parser.add_argument("--max-shard-size", default="5GB", help="HF output: bytes per shard")
    parser.add_argument("--tokenizer", default="auto", help="auto (the first model's), a path, 'byte' or 'none'")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if bool(args.config) == bool(args.models):
        parser.error("give either --config or --models")
    if args.config:
        spec = load_merge_config(args.config)
        if args.dtype != "auto":
            spec.dtype = parse_dtype(args.dtype)
    else:
        spec = MergeSpec(models=args.models, weights=args.weights or [1.0] * len(args.models), method=args.method,
                         normalize=not args.no_normalize, t=args.t, dtype=parse_dtype(args.dtype))
    result = merge(spec, args.out, args.out_hf, parse_size(args.max_shard_size),
                   tokenizer=None if args.tokenizer == "none" else args.tokenizer, progress=not args.no_progress)
    for kind, path in result.items():
        print(f"wrote {kind}: {path}")


if __name__ == "__main__":
    main()
