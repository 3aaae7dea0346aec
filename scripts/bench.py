"""Model-level training-step benchmark on one GPU: a Bamba-9B-width slice, tokens/s, MFU, memory.

    python scripts/bench.py --layers 8 --attn 4 --seq-len 4096 --batch 1
    python scripts/bench.py --ladder                      # kernels switched on one at a time
    python scripts/bench.py --device cpu --tiny --ladder --seq-len 64 --steps 1 --warmup 0   # smoke
    python scripts/bench.py --moe --layers 8 --attn 4 --seq-len 4096    # Jamba-width MoE slice

Forward + backward (+ AdamW step with --optimizer) of a slice of Bamba-9B (all widths exact, fewer
layers), parameters in bf16, loss outside the model, median over timed steps after warm-up.

``--master-weights`` keeps the trainer's precision on one GPU instead: fp32 masters and AdamW
moments, bf16 autocast on bf16 weights with split fp32 masters (hybrid_train/train/precision.py), and
with --optimizer the trainer's gradient norm and clip (1.0) folded into the step. The trainer's own
step is then this plus its data, logging and host time (`scripts/bench_train.py`).

``--fused-loss`` computes the loss in the model's head (``model(ids, labels=...)``, the fused linear
cross-entropy) instead of ``lm_loss`` on the logits.

``--moe`` benchmarks the MoE slice instead: Jamba's width and layout (d 4096, vocab 65536, MoE MLP in
every 2nd block from 1 with 16 experts of width 14336, top-2; dense SwiGLU 14336 in the others;
Mamba-2 mixers of Bamba's shape), once with the experts as grouped GEMMs (``torch._grouped_mm``
where this build and GPU run it) and once as a loop over experts (the baseline). MFU counts the
active parameters (top-2 of 16 experts).

``--ladder`` runs the same model once per variant: all PyTorch reference; +ssd; +conv1d; +gated_norm; +rms_norm;
+mixer (conv1d + SSD fused, conv outputs recomputed in backward); +swiglu; with --fused-loss also
+cross_entropy (its Triton row kernels); each keeps the kernels before it on (the per-op switches of
hybrid_train.ops.dispatch). Activation memory per token is measured on one extra
forward (+ loss) per variant: ``act_bytes_per_token`` sums the bytes autograd saves for backward
(unique storages, parameters excluded; works on CPU too), ``act_alloc_bytes_per_token`` is the CUDA
memory allocated after that forward minus before (so it also holds the logits).
On CPU the Triton variants need TRITON_INTERPRET=1; without it every variant runs the reference.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import time
import weakref
from typing import Iterable

import torch

from hybrid_train.model import ModelConfig, active_params, build_model, count_params, flops_per_token
from hybrid_train.model.config import MAMBA
from hybrid_train.model.moe import grouped_mm_supported
from hybrid_train.ops import set_kernels
from hybrid_train.ops.dispatch import OPS, interpreting, torch_ops
from hybrid_train.train.config import OptimConfig
from hybrid_train.train.loss import lm_loss
from hybrid_train.parallel import total_norm
from hybrid_train.train.optim import build_optimizer, clip_and_step
from hybrid_train.train.precision import BF16Weights
from hybrid_train.train.metrics import device_peak_flops

BAMBA_9B = dict(name="bamba_9b_slice", vocab_size=128256, d_model=4096, mlp_hidden=14336, n_heads=32, n_kv_heads=8,
                head_dim=128, ssm_d_state=128, ssm_head_dim=64, ssm_n_groups=1, ssm_chunk_size=256)
TINY = dict(name="tiny_slice", vocab_size=512, d_model=64, mlp_hidden=128, n_heads=4, n_kv_heads=2, head_dim=16,
            ssm_d_state=16, ssm_head_dim=16, ssm_n_groups=2, ssm_chunk_size=16)
# --moe: Jamba's MoE placement and sizes on top of the widths above (Jamba-v0.1: vocab 65536).
JAMBA_MOE = dict(name="jamba_slice", vocab_size=65536, moe_n_experts=16, moe_top_k=2, moe_hidden=14336,
                 moe_norm_topk=False, moe_every=2, moe_offset=1)
TINY_MOE = dict(name="tiny_moe_slice", moe_n_experts=8, moe_top_k=2, moe_hidden=64, moe_every=2, moe_offset=1)
MOE_VARIANTS = ("grouped", "loop")
# --ladder switches these on in this order, each variant keeping the ones before it.
LADDER = ("ssd", "conv1d", "gated_norm", "rms_norm", "mixer", "swiglu")
MODEL_OPS = tuple(op for op in OPS if op != "sum_squares")  # (the sum of squares is the gradient norm's, not the model's)


class SavedBytes:
    """Context: bytes autograd holds for backward, saved while it was active.

    Counts each storage once (by data_ptr: views of one tensor, and one tensor saved by several ops,
    are one allocation), skips the storages of ``exclude`` (the parameters, which exist anyway), and
    counts only tensors still alive when read: a graph branch that no output depends on is freed
    during the forward, with what it saved.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._skip = {t.untyped_storage().data_ptr() for t in exclude}
        self._saved: list[weakref.ref] = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        # Detached: an op's output saved as itself would hold its own grad_fn, a cycle that outlives
        # a freed branch until the garbage collector runs.
        t = t.detach()
        self._saved.append(weakref.ref(t))
        return t

    @property
    def bytes(self) -> int:
        sizes = {}
        for ref in self._saved:
            t = ref()
            if t is not None and t.untyped_storage().data_ptr() not in self._skip:
                sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(sizes.values())

    def __enter__(self) -> "SavedBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def variants(ladder: bool, fused_loss: bool, moe: bool = False) -> list[tuple[str, tuple[str, ...]]]:
    """(name, ops forced to the PyTorch reference) of each variant to run; with moe, one per expert
    implementation (all kernels on)."""
    if moe:
        return [(f"moe_{impl}", ()) for impl in MOE_VARIANTS]
    if not ladder:
        return [("kernels", ())]
    steps = LADDER + (("cross_entropy",) if fused_loss else ())
    return [("reference" if i == 0 else "+" + steps[i - 1], tuple(op for op in MODEL_OPS if op not in steps[:i]))
            for i in range(len(steps) + 1)]


def _table(results: list[dict]) -> str:
    def cell(value, width: int, digits: int) -> str:
        return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"

    lines = [f"{'variant':<15}{'tokens/s':>12}{'MFU':>8}{'peak GB':>9}{'saved B/tok':>13}{'alloc B/tok':>13}"]
    lines += [f"{r['variant']:<15}{r['tokens_per_s']:>12.0f}{cell(r['mfu'], 8, 3)}{cell(r['peak_mem_gb'], 9, 2)}"
              f"{r['act_bytes_per_token']:>13.0f}{cell(r['act_alloc_bytes_per_token'], 13, 0)}" for r in results]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--attn", type=int, nargs="*", default=[4], help="attention layer indices")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--documents", type=int, default=1, help="documents packed per row (seq_idx)")
    parser.add_argument("--optimizer", action="store_true",
                        help="include an AdamW step (build_optimizer's: Triton on CUDA) on the bf16 parameters and "
                             "states here; the trainer keeps fp32 masters and moments")
    parser.add_argument("--master-weights", action="store_true",
                        help="fp32 masters and moments, bf16 weights with split fp32 masters under autocast (train.py "
                             "on one GPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block")
    parser.add_argument("--fused-loss", action="store_true", help="loss in the model's head, fused with it")
    parser.add_argument("--ladder", action="store_true", help="switch the kernels on one at a time")
    parser.add_argument("--moe", action="store_true", help="the Jamba-width MoE slice: grouped GEMM vs expert loop")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run (with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="tiny widths instead of Bamba-9B's")
    parser.add_argument("--json", help="append the results as JSON lines to this file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    # On CPU the kernels run only through Triton's interpreter; "auto" would pick the reference.
    mode = "triton" if not cuda and interpreting() else "auto"
    if args.moe and args.ladder:
        parser.error("--moe and --ladder are separate benchmarks; pick one")
    widths = {**(TINY if args.tiny else BAMBA_9B), **((TINY_MOE if args.tiny else JAMBA_MOE) if args.moe else {})}
    cfg = ModelConfig(**widths, n_layers=args.layers, attn_layer_indices=args.attn).validate()
    torch.manual_seed(0)
    model = build_model(cfg, device=device)
    if not args.master_weights:
        model = model.to(torch.bfloat16)
    if args.compile:
        for block in model.layers.values():
            block.compile()
    n_params, n_emb = count_params(model)
    # (on CPU the Triton step of split masters runs only when asked for, through the interpreter)
    impl = "triton" if args.master_weights and not cuda and interpreting() else "auto"
    opt = build_optimizer(model, OptimConfig(lr=1e-5, impl=impl)) if args.optimizer else None
    bf16_weights = BF16Weights(model, enabled=args.master_weights)
    if args.master_weights and opt is not None:
        try:
            bf16_weights.attach(opt)
        except TypeError as err:
            parser.error(f"--master-weights --optimizer: {err} (the Triton step: CUDA, or TRITON_INTERPRET=1)")
    precision = (torch.autocast(device.type, dtype=torch.bfloat16) if args.master_weights
                 else contextlib.nullcontext())

    b, t = args.batch, args.seq_len
    ids = torch.randint(0, cfg.vocab_size, (b, t + 1), device=device)
    bounds = torch.linspace(0, t, args.documents + 1, device=device).long()[1:-1]
    seq_idx = torch.bucketize(torch.arange(t, device=device), bounds, right=True).int().expand(b, t).contiguous()
    starts = torch.cat([torch.zeros(1, device=device, dtype=torch.long), bounds])
    position_ids = (torch.arange(t, device=device) - starts[seq_idx[0].long()]).expand(b, t).contiguous()

    def forward_loss() -> torch.Tensor:
        inputs = (ids[:, :-1], position_ids, seq_idx if args.documents > 1 else None)
        with precision:  # (as the trainer: autocast around the model, the loss on its logits outside)
            out = model(*inputs, labels=ids[:, 1:]) if args.fused_loss else model(*inputs)
        return out[0] if args.fused_loss else lm_loss(out, ids[:, 1:])[0]

    def zero_grad() -> None:
        model.zero_grad(set_to_none=True)
        bf16_weights.zero_grad()

    def step() -> None:
        forward_loss().backward()
        if opt is not None and args.master_weights:
            clip_and_step(opt, total_norm(bf16_weights.grads(model.parameters())), 1.0)
        elif opt is not None:
            opt.step()
        zero_grad()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    peak = device_peak_flops(device, None)
    flops = flops_per_token(cfg, n_params, n_emb, t)
    results = []
    try:
        for name, reference_ops in variants(args.ladder, args.fused_loss, args.moe):
            set_kernels(mode, reference_ops)
            experts = [moe.experts for moe in model.moe_blocks().values()]
            for e in experts:  # auto: grouped GEMMs where this build and device run them
                e.impl = "loop" if name == "moe_loop" else "auto"
            grouped = bool(experts) and name != "moe_loop" and grouped_mm_supported(
                torch.empty(1, cfg.d_model, device=device, dtype=torch.bfloat16), experts[0].gate_up_proj,
                experts[0].down_proj)
            if args.compile:
                torch._dynamo.reset()  # the kernel choice is baked into compiled graphs
            for _ in range(args.warmup):
                step()
            sync()
            before = torch.cuda.memory_allocated(device) if cuda else 0
            with SavedBytes([*model.parameters(), *bf16_weights.low.values()]) as saved:
                loss = forward_loss()
            sync()
            alloc = torch.cuda.memory_allocated(device) - before if cuda else None
            saved_bytes = saved.bytes  # while the graph holds them
            loss.backward()
            del loss
            zero_grad()
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            times = []
            for _ in range(args.steps):
                start = time.perf_counter()
                step()
                sync()
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            tokens_per_s = b * t / seconds
            results.append({
                "date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(device) if cuda else "cpu",
                "torch": torch.__version__, "variant": name,
                "torch_ops": [op for op in OPS if op in torch_ops()],  # with HYBRID_TRAIN_TORCH_OPS's
                "layers": args.layers, "mamba_layers": cfg.layer_types.count(MAMBA), "attn": args.attn,
                "seq_len": t, "batch": b, "documents": args.documents, "compile": args.compile,
                "optimizer": args.optimizer, "master_weights": args.master_weights, "fused_loss": args.fused_loss,
                "params": n_params,
                "active_params": active_params(cfg, n_params), "moe_grouped_mm": grouped if args.moe else None,
                "step_ms": seconds * 1e3, "tokens_per_s": tokens_per_s,
                "mfu": tokens_per_s * flops / peak if peak else None,
                "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None,
                "act_bytes_per_token": saved_bytes / (b * t),
                "act_alloc_bytes_per_token": alloc / (b * t) if alloc is not None else None,
                "model": dataclasses.asdict(cfg)["name"],
            })
            print(json.dumps(results[-1]), flush=True)
    finally:
        set_kernels("auto")
    if args.ladder or args.moe:
        print(_table(results))
    if args.json:
        with open(args.json, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
    return results


if __name__ == "__main__":
    main()
