"""Model-level training-step benchmark on one GPU: a Bamba-9B-width slice, tokens/s, MFU, memory.

    python scripts/bench.py --layers 8 --attn 4 --seq-len 4096 --batch 1

Forward + backward (+ AdamW step with --optimizer) of a slice of Bamba-9B (all widths exact, fewer
layers), parameters in bf16, loss outside the model, median over timed steps after warm-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

from hybrid_train.model import ModelConfig, build_model, count_params, flops_per_token
from hybrid_train.train.loss import lm_loss
from hybrid_train.train.metrics import device_peak_flops

BAMBA_9B = dict(name="bamba_9b_slice", vocab_size=128256, d_model=4096, mlp_hidden=14336, n_heads=32, n_kv_heads=8,
                head_dim=128, ssm_d_state=128, ssm_head_dim=64, ssm_n_groups=1, ssm_chunk_size=256)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--attn", type=int, nargs="*", default=[4], help="attention layer indices")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--documents", type=int, default=1, help="documents packed per row (seq_idx)")
    parser.add_argument("--optimizer", action="store_true", help="include an AdamW step (fp32 states)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block")
    parser.add_argument("--json", help="append the result as a JSON line to this file")
    args = parser.parse_args()

    device = torch.device("cuda")
    cfg = ModelConfig(**BAMBA_9B, n_layers=args.layers, attn_layer_indices=args.attn).validate()
    torch.manual_seed(0)
    model = build_model(cfg, device=device).to(torch.bfloat16)
    if args.compile:
        for block in model.layers.values():
            block.compile()
    n_params, n_emb = count_params(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5) if args.optimizer else None

    b, t = args.batch, args.seq_len
    ids = torch.randint(0, cfg.vocab_size, (b, t + 1), device=device)
    bounds = torch.linspace(0, t, args.documents + 1, device=device).long()[1:-1]
    seq_idx = torch.bucketize(torch.arange(t, device=device), bounds, right=True).int().expand(b, t).contiguous()
    starts = torch.cat([torch.zeros(1, device=device, dtype=torch.long), bounds])
    position_ids = (torch.arange(t, device=device) - starts[seq_idx[0].long()]).expand(b, t).contiguous()

    def step() -> None:
        logits = model(ids[:, :-1], position_ids, seq_idx if args.documents > 1 else None)
        loss, _ = lm_loss(logits, ids[:, 1:])
        loss.backward()
        if opt is not None:
            opt.step()
        model.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens_per_s = b * t / seconds
    peak = device_peak_flops(device, None)
    flops = flops_per_token(cfg, n_params, n_emb, t)
    result = {
        "date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "layers": args.layers, "attn": args.attn, "seq_len": t, "batch": b, "documents": args.documents,
        "compile": args.compile, "optimizer": args.optimizer, "params": n_params,
        "step_ms": seconds * 1e3, "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * flops / peak if peak else None,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9,
        "model": dataclasses.asdict(cfg)["name"],
    }
    print(json.dumps(result))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
