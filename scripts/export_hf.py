"""Export a native checkpoint (or re-export a HF directory) as a Hugging Face Bamba directory, or a
GraniteMoeHybrid one for a mixture-of-experts model.

    python scripts/export_hf.py --checkpoint outputs/tiny-sample --out exports/tiny-hf [--dtype bf16]

Writes config.json (every BambaConfig / GraniteMoeHybridConfig field), safetensors shards of at most
--max-shard-size with model.safetensors.index.json, generation_config.json and the tokenizer files (by
default the run's `data.tokenizer`, or the tokenizer an import kept). Streams tensor by tensor: memory about one shard.
"""

from __future__ import annotations

import argparse

from hybrid_train.train.export import DEFAULT_MAX_SHARD, export_hf, parse_dtype, parse_size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint dir, run dir, or a HF Bamba dir")
    parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--dtype", default="auto", help="auto (as stored), bf16, fp16 or fp32")
    parser.add_argument("--max-shard-size", default=str(DEFAULT_MAX_SHARD), help="bytes per shard, e.g. 5GB, 500MB")
    parser.add_argument("--tokenizer", default="auto",
                        help="auto (the run's), a tokenizer.json or folder, 'byte', or 'none'")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    result = export_hf(args.checkpoint, args.out, parse_dtype(args.dtype), parse_size(args.max_shard_size),
                       tokenizer=None if args.tokenizer == "none" else args.tokenizer, progress=not args.no_progress)
    print(f"wrote {result.out_dir}: {result.shards} shard(s), {result.total_bytes / 1e6:.1f} MB of tensors, "
          f"tokenizer: {result.tokenizer or 'none'}")


if __name__ == "__main__":
    main()
