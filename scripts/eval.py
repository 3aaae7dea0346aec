"""Held-out loss and perplexity per data source of a checkpoint (native or a HF Bamba directory).

    python scripts/eval.py --checkpoint outputs/tiny-sample data=sample [data.root=...] [train.seq_len=512]
        [--max-tokens 1000000] [--out eval.json]

The data config is composed from conf/ exactly as train.py does (Hydra overrides: `data=NAME`,
`data.sources.web.paths=[...]`, `train.seq_len`, `train.micro_batch_size`, ...); the model comes from
the checkpoint. Each source is read on its own through the training data loader (same tokenizer,
framing, packing and document masking as in training) and scored on its first --max-tokens tokens
(rounded up to whole batches). A source's held-out split is its `eval_paths` (shards training never
reads, e.g. `data.sources.web.eval_paths=[web/part-00003.jsonl.zst]`); a source without one is scored on
its training shards, which is said on stderr and marked `"held_out": false`. Prints and writes JSON:
{"sources": {name: {"tokens", "loss", "perplexity", "held_out"}}, "all": {...}, ...}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from hybrid_train.config import load_config
from hybrid_train.data import build_data_loader, build_tokenizer
from hybrid_train.train.export import load_source_model

CONF = Path(__file__).resolve().parents[1] / "conf"


@torch.no_grad()
def evaluate_source(model, loader, batches: int, device: torch.device, bar=None) -> tuple[float, int]:
    """(summed next-token cross entropy, tokens scored) over `batches` batches of the loader."""
    total, count = 0.0, 0
    for _ in range(batches):
        batch = {k: v.to(device) for k, v in next(loader).items()}
        logits = model(batch["input_ids"], batch["position_ids"], batch["seq_idx"])  # (b, l, v)
        total += F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), reduction="sum").item()
        count += batch["labels"].numel()
        if bar is not None:
            bar.update(batch["labels"].numel())
    return total, count


def evaluate(checkpoint: str, overrides: list[str], max_tokens: int = 1_000_000, device: str = "auto",
             dtype: torch.dtype = torch.float32, progress: bool = True, config_dir: Path = CONF) -> dict:
    job = load_config(overrides, config_dir)
    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          ("cpu" if device == "auto" else device))
    model = load_source_model(checkpoint, device=device, dtype=dtype)
    tokenizer = build_tokenizer(job.data.tokenizer)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"data.tokenizer={job.data.tokenizer!r} has {tokenizer.vocab_size} tokens but the "
                         f"checkpoint's model has vocab_size {model.cfg.vocab_size}")
    seq_len, batch_size = job.train.seq_len, job.train.micro_batch_size
    batches = max(1, math.ceil(max_tokens / (seq_len * batch_size)))
    result = {"checkpoint": str(checkpoint), "seq_len": seq_len, "batch_size": batch_size, "sources": {}}
    all_loss, all_tokens = 0.0, 0
    for name in sorted(job.data.sources):
        source = job.data.sources[name]
        held_out = bool(source.eval_paths)
        if held_out:  # the held-out shards as the whole source
            source = dataclasses.replace(source, paths=list(source.eval_paths), eval_paths=[])
        else:
            print(f"eval: source {name!r} has no held-out split (data.sources.{name}.eval_paths is empty): scoring "
                  "the shards it trains on, not held-out data", file=sys.stderr, flush=True)
        only = dataclasses.replace(job.data, sources={name: dataclasses.replace(source, weight=1.0)})
        loader = build_data_loader(only, tokenizer, seq_len, batch_size, 0, 1, job.train.seed)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=batches * seq_len * batch_size, desc=f"eval {name}", unit="tok", file=sys.stderr)
        loss, tokens = evaluate_source(model, loader, batches, device, bar)
        if bar is not None:
            bar.close()
        result["sources"][name] = {**_summary(loss, tokens), "held_out": held_out}
        all_loss, all_tokens = all_loss + loss, all_tokens + tokens
    result["all"] = {**_summary(all_loss, all_tokens),
                     "held_out": all(r["held_out"] for r in result["sources"].values())}
    return result


def _summary(loss_sum: float, tokens: int) -> dict:
    loss = loss_sum / tokens
    return {"tokens": tokens, "loss": loss, "perplexity": math.exp(min(loss, 700.0))}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint dir, run dir or HF Bamba dir")
    parser.add_argument("--max-tokens", type=int, default=1_000_000, help="tokens scored per source")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--out", help="write the JSON result here too")
    parser.add_argument("--no-progress", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    bad = [a for a in overrides if "=" not in a or a.startswith("-")]
    if bad:
        parser.error(f"unrecognized arguments {bad}; Hydra overrides look like data=NAME or train.seq_len=512")
    result = evaluate(args.checkpoint, overrides, args.max_tokens, args.device,
                      torch.bfloat16 if args.dtype == "bf16" else torch.float32, not args.no_progress)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
