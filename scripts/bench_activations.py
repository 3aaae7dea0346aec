"""Activation bytes per token of each layer type at Bamba-9B width, on one GPU: the planner's act_* inputs.

    python scripts/bench_activations.py --json act.jsonl

Builds small slices (M, MM, MA, and M / MM without MLPs, Mamba-2 = M, attention = A) and the 8-block
slice of scripts/bench.py (MMMMAMMM) in bf16, with every kernel on and the fused head + loss, for each
activation checkpointing mode. Per slice: CUDA memory allocated after the forward minus before (what
the forward keeps for backward) and the peak of forward + backward. Per layer type by differences:
Mamba-2 + MLP = MM - M, attention + MLP = MA - M, MLP = (MM - MM without MLPs) / 2, head = M - (M - head).
The 8-block slice is held out: the sums must reproduce it.

The fused head is measured recomputing its logits chunk by chunk (the planner's act_head and
act_head_backward); when the bf16 logits fit its 2 GiB budget it keeps them instead, which the
planner adds exactly (2 bytes x vocabulary per token, and the bf16 hidden gradient in the head's
backward). One more reading of slice M with the logits kept checks that.
"""

from __future__ import annotations

import argparse
import gc
import json

import torch

from bench import BAMBA_9B
from hybrid_train.model import ModelConfig, build_model
from hybrid_train.ops import cross_entropy, set_kernels
from hybrid_train.parallel.ac import apply_ac

SLICES = (("M", 14336), ("MM", 14336), ("MA", 14336), ("M", 0), ("MM", 0), ("MMMMAMMM", 14336))


def measure(pattern: str, mlp_hidden: int, ac: str, batch: int, seq_len: int, documents: int,
            keep_logits: bool = False) -> dict:
    budget = cross_entropy._KEEP_LOGITS_BYTES
    cross_entropy._KEEP_LOGITS_BYTES = budget if keep_logits else -1
    try:
        return _measure(pattern, mlp_hidden, ac, batch, seq_len, documents) | {"keep_logits": keep_logits}
    finally:
        cross_entropy._KEEP_LOGITS_BYTES = budget


def _measure(pattern: str, mlp_hidden: int, ac: str, batch: int, seq_len: int, documents: int) -> dict:
    cfg = ModelConfig(**{**BAMBA_9B, "mlp_hidden": mlp_hidden}, n_layers=len(pattern), layer_pattern=pattern).validate()
    torch.manual_seed(0)
    model = build_model(cfg, device="cuda").to(torch.bfloat16)
    apply_ac(model, ac)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), device="cuda")
    starts = torch.arange(documents, device="cuda") * (seq_len // documents)
    seq_idx = torch.bucketize(torch.arange(seq_len, device="cuda"), starts[1:], right=True).int()
    position_ids = torch.arange(seq_len, device="cuda") - starts[seq_idx.long()]
    seq_idx, position_ids = (t[None].expand(batch, seq_len).contiguous() for t in (seq_idx, position_ids))

    def loss():
        return model(ids[:, :-1], position_ids, seq_idx, labels=ids[:, 1:])[0]

    for _ in range(2):  # warm-up: kernels compiled, allocator settled
        loss().backward()
        model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = loss()
    after_forward = torch.cuda.memory_allocated()
    out.backward()
    torch.cuda.synchronize()
    result = dict(pattern=pattern, mlp_hidden=mlp_hidden, ac=ac, tokens=batch * seq_len, before=before,
                  after_forward=after_forward, peak=torch.cuda.max_memory_allocated(),
                  grads=sum(p.grad.nbytes for p in model.parameters()), gpu=torch.cuda.get_device_name(),
                  torch=torch.__version__)
    del model, out
    gc.collect()
    torch.cuda.empty_cache()
    return result


def per_layer_type(rows: list[dict], ac: str) -> dict[str, float]:
    """Kept bytes per token by layer type from the slices' differences, and the held-out 8-block check."""
    kept = {(r["pattern"], r["mlp_hidden"]): (r["after_forward"] - r["before"]) / r["tokens"] for r in rows
            if r["ac"] == ac}
    mamba_mlp = kept["MM", 14336] - kept["M", 14336]
    attention_mlp = kept["MA", 14336] - kept["M", 14336]
    mlp = (kept["MM", 14336] - kept["MM", 0]) / 2
    head = kept["M", 14336] - mamba_mlp
    return {"mamba": mamba_mlp - mlp, "attention": attention_mlp - mlp, "mlp": mlp, "head": head,
            "8-block predicted": 7 * mamba_mlp + attention_mlp + head, "8-block measured": kept["MMMMAMMM", 14336]}


def backward_terms(rows: list[dict]) -> dict[str, float]:
    """Bytes per token in flight during backward beyond kept activations and weight gradients (planner's
    act_head_backward, act_block_backward, act_selective_recompute), from the one-block slice M, and
    the held-out check of the 8-block slice's peak under full checkpointing."""
    r = {(x["pattern"], x["mlp_hidden"], x["ac"]): x for x in rows}
    table = BAMBA_9B["vocab_size"] * BAMBA_9B["d_model"] * 2  # bf16 gradient of the embedding or the head
    block_input = BAMBA_9B["d_model"] * 2
    kept = per_layer_type(rows, "none")
    recomputed = kept["mamba"] + kept["mlp"]

    def per_token(x, key):
        return (x[key] - x["before"]) / x["tokens"]

    none, full, sel = r["M", 14336, "none"], r["M", 14336, "full"], r["M", 14336, "selective"]
    t = none["tokens"]
    # none and selective peak in the last block's (or the head's) backward: everything kept is still held
    head_backward = per_token(none, "peak") - per_token(none, "after_forward") - table / t
    selective = per_token(sel, "peak") - per_token(sel, "after_forward") - (sel["grads"] - table) / t
    # full peaks in the first block's backward: its input and recomputed activations, every gradient but
    # the embedding's (not yet computed)
    full_backward = per_token(full, "peak") - block_input - (full["grads"] - table) / t - recomputed
    eight = r["MMMMAMMM", 14336, "full"]
    predicted = block_input + (eight["grads"] - table) / t + recomputed + full_backward
    return {"head_backward": head_backward, "block_backward": full_backward, "selective_recompute": selective,
            "8-block full peak predicted": predicted, "8-block full peak measured": per_token(eight, "peak")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--documents", type=int, default=4, help="documents packed per row (seq_idx)")
    parser.add_argument("--json", help="append the raw readings as JSON lines to this file")
    args = parser.parse_args()
    set_kernels("auto")
    rows = [measure(p, m, ac, args.batch, args.seq_len, args.documents)
            for ac in ("none", "full", "selective") for p, m in SLICES]
    for ac in ("none", "full", "selective"):
        print(ac, json.dumps({k: round(v) for k, v in per_layer_type(rows, ac).items()}))
    print("backward", json.dumps({k: round(v) for k, v in backward_terms(rows).items()}))
    kept = measure("M", 14336, "none", args.batch, args.seq_len, args.documents, keep_logits=True)
    print("kept logits", json.dumps({k: round(v) for k, v in kept_logits_check(rows, kept).items()}))
    if args.json:
        with open(args.json, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows + [kept])


def kept_logits_check(rows: list[dict], kept: dict) -> dict[str, float]:
    """Slice M with the head's logits kept, against the recomputing reading plus the planner's exact
    terms: 2 x vocabulary bytes per token kept, and in the head's backward the bf16 hidden gradient in
    place of act_head_backward."""
    (base,) = [r for r in rows if (r["pattern"], r["mlp_hidden"], r["ac"]) == ("M", 14336, "none")]
    t = base["tokens"]
    logits, hidden_grad = 2 * BAMBA_9B["vocab_size"], 2 * BAMBA_9B["d_model"]
    head_backward = backward_terms(rows)["head_backward"]
    return {"kept predicted": (base["after_forward"] - base["before"]) / t + logits,
            "kept measured": (kept["after_forward"] - kept["before"]) / t,
            "peak predicted": (base["peak"] - base["before"]) / t + logits - head_backward + hidden_grad,
            "peak measured": (kept["peak"] - kept["before"]) / t}


if __name__ == "__main__":
    main()
