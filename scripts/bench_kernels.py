"""Kernel benchmarks on one GPU: SSD scan (forward, forward+backward), fused linear cross-entropy,
causal conv1d, gated RMSNorm — Triton kernels against the PyTorch reference path.

    python scripts/bench_kernels.py                 # everything
    python scripts/bench_kernels.py --only ssd --json out.jsonl

Times are medians of triton.testing.do_bench (CUDA events, warm-up excluded) on random inputs.
SSD FLOPs follow the reference facts: forward 2*H*P*(Q + 2N) + 2*G*Q*N per token, forward+backward
three times that; bytes are the floor (each input read once, each output written once).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import triton

from hybrid_train.ops import set_kernels
from hybrid_train.ops.ssd import ssd_chunk_scan

ANCHOR = dict(b=2, l=4096, h=128, p=64, g=1, n=128, chunk=256)
# mamba_ssm 2.3.2 on an H100 80GB, torch 2.11 / triton 3.6, bf16 (reference facts)
MAMBA_SSM_MS = {"fwd": 0.59, "fwd_bwd": 3.43}


def bench(fn, warmup=25, rep=100) -> float:
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def ssd_inputs(b, l, h, p, g, n, dtype=torch.bfloat16, docs=1, grad=True, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=dev) * scale).to(dtype)

    t = dict(
        x=rnd(b, l, h, p), dt=rnd(b, l, h, scale=0.5) - 2.0, B=rnd(b, l, g, n), C=rnd(b, l, g, n),
        A=-torch.empty(h, device=dev).uniform_(1.0, 16.0, generator=gen),
        D=torch.ones(h, device=dev), dt_bias=torch.randn(h, device=dev, generator=gen) * 0.1,
    )
    if grad:
        for v in t.values():
            v.requires_grad_(True)
    seq_idx = None
    if docs > 1:
        bounds = torch.linspace(0, l, docs + 1, device=dev).long()[1:-1]
        seq_idx = torch.bucketize(torch.arange(l, device=dev), bounds, right=True).int().expand(b, l).contiguous()
    return t, seq_idx


def ssd_call(t, chunk, seq_idx):
    return ssd_chunk_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk, D=t["D"], dt_bias=t["dt_bias"],
                          dt_softplus=True, seq_idx=seq_idx)


def bench_ssd(b, l, h, p, g, n, chunk, docs=1, mode="triton"):
    set_kernels(mode)
    t, seq_idx = ssd_inputs(b, l, h, p, g, n, docs=docs)
    dy = torch.randn(b, l, h, p, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        fwd = bench(lambda: ssd_call(t, chunk, seq_idx))
    leaves = list(t.values())

    def fwd_bwd():
        y = ssd_call(t, chunk, seq_idx)
        torch.autograd.grad(y, leaves, dy)

    fb = bench(fwd_bwd)
    set_kernels("auto")
    tokens = b * l
    flops = tokens * (2 * h * p * (chunk + 2 * n) + 2 * g * chunk * n)
    bytes_fwd = tokens * (2 * h * p * 2 + 2 * g * n * 2 + h * 2)  # x, y, B, C, dt in bf16
    return {
        "op": "ssd", "impl": mode, "b": b, "l": l, "h": h, "p": p, "g": g, "n": n, "chunk": chunk, "docs": docs,
        "fwd_ms": fwd, "fwd_bwd_ms": fb,
        "fwd_tflops": flops / fwd / 1e9, "fwd_bwd_tflops": 3 * flops / fb / 1e9,
        "fwd_gbps": bytes_fwd / fwd / 1e6, "fwd_gflop": flops / 1e9, "fwd_mb": bytes_fwd / 1e6,
    }


def ssd_sweep(results, with_reference=False):
    a = ANCHOR
    shapes = [dict(a), dict(a, docs=4), dict(a, g=8), dict(a, b=1, l=2048), dict(a, b=1, l=4096),
              dict(a, b=1, l=8192), dict(a, b=1, l=16384)]
    for s in shapes:
        docs = s.pop("docs", 1)
        results.append(bench_ssd(**s, docs=docs))
        print(json.dumps(results[-1]), flush=True)
    if with_reference:
        results.append(bench_ssd(**a, mode="torch"))
        print(json.dumps(results[-1]), flush=True)


def warm_ssd_step(b, l, h, p, g, n, chunk, docs=1):
    """An eager SSD forward+backward at this shape (Triton kernels), compiled and warmed up."""
    set_kernels("triton")
    t, seq_idx = ssd_inputs(b, l, h, p, g, n, docs=docs)
    dy = torch.randn(b, l, h, p, device="cuda", dtype=torch.bfloat16)
    leaves = list(t.values())

    def step():
        return torch.autograd.grad(ssd_call(t, chunk, seq_idx), leaves, dy)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    return step


def profile_ssd(b, l, h, p, g, n, chunk, docs=1, iters=5) -> list[str]:
    """Per-kernel GPU time of one forward+backward (torch.profiler), largest first."""
    from torch.profiler import ProfilerActivity, profile

    step = warm_ssd_step(b, l, h, p, g, n, chunk, docs)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    set_kernels("auto")
    rows = []
    for ev in prof.key_averages():
        dev_us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if dev_us > 0:
            rows.append((dev_us / iters, ev.count // iters, ev.key))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    return [f"{us:8.1f} us x{cnt:<3d} {name[:90]}" for us, cnt, name in rows[:25]] + [f"{total:8.1f} us total"]


# Launch variants tried by --sweep, each on top of the defaults: (label, {LAUNCH key: value}); a dict
# value updates that kernel's options, anything else replaces the entry.
SWEEP = [
    ("default", {}),
    ("dt gradient 2 warps", {"dt_bwd": dict(num_warps=2)}),
    ("dt gradient 4 warps", {"dt_bwd": dict(num_warps=4)}),
]
# Forward-only variants (--sweep-fwd)
SWEEP_FWD = [("default", {})] + [
    (f"scan forward {w} warps, {st} stages", {"scan_fwd": dict(num_warps=w, num_stages=st)})
    for w, st in [(4, 1), (4, 3)]
]


def sweep_ssd(results, variants=SWEEP, fwd_only=False) -> None:
    import copy

    from hybrid_train.ops.ssd import ssd_chunk_scan_torch
    from hybrid_train.ops.triton.common import LAUNCH

    t, _ = ssd_inputs(**{k: ANCHOR[k] for k in ("b", "l", "h", "p", "g", "n")}, grad=False, seed=11)
    t64 = {k: v.double() for k, v in t.items()}
    with torch.no_grad():
        y64 = ssd_chunk_scan_torch(t64["x"], t64["dt"], t64["A"], t64["B"], t64["C"], ANCHOR["chunk"],
                                   D=t64["D"], dt_bias=t64["dt_bias"], dt_softplus=True)
    base = copy.deepcopy(LAUNCH)
    for label, change in variants:
        LAUNCH.clear()
        LAUNCH.update(copy.deepcopy(base))
        for k, v in change.items():
            if isinstance(v, dict):
                LAUNCH[k].update(v)
            else:
                LAUNCH[k] = v
        try:
            set_kernels("triton")
            with torch.no_grad():
                y = ssd_call(t, ANCHOR["chunk"], None)
            err = ((y.double() - y64).norm() / y64.norm()).item()
            if fwd_only:
                with torch.no_grad():
                    r = {"op": "ssd_sweep", "fwd_ms": bench(lambda: ssd_call(t, ANCHOR["chunk"], None)),
                         "fwd_bwd_ms": float("nan"), "graph_ms": float("nan")}
            else:
                r = bench_ssd(**ANCHOR)
                r["graph_ms"] = bench_ssd_overhead(**ANCHOR)["graph_ms"]  # GPU time alone: hosts differ
        except Exception as e:  # a variant that does not compile or fit is reported, not fatal
            print(f"sweep {label}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        r["variant"] = label
        r["fwd_rel_err"] = err
        results.append(r)
        print(f"sweep {label:18s} fwd {r['fwd_ms']:.3f} ms  fwd+bwd {r['fwd_bwd_ms']:.3f} ms (GPU time {r['graph_ms']:.3f})"
              f"  fwd rel err {err:.1e}", flush=True)
    LAUNCH.clear()
    LAUNCH.update(base)


def bench_ce(t=8192, d=4096, v=128256) -> list[dict]:
    """Fused linear cross-entropy vs the unfused head + lm_loss: time and peak extra memory."""
    from hybrid_train.ops.cross_entropy import fused_linear_cross_entropy
    from hybrid_train.train.loss import lm_loss

    h = torch.randn(t, d, device="cuda").bfloat16().requires_grad_(True)
    w = (torch.randn(v, d, device="cuda") * 0.02).bfloat16().requires_grad_(True)
    labels = torch.randint(0, v, (t,), device="cuda")
    out = []
    for name, fn in [("fused", lambda: fused_linear_cross_entropy(h, w, labels, z_loss=1e-4)[0]),
                     ("fused, logits recomputed",
                      lambda: fused_linear_cross_entropy(h, w, labels, z_loss=1e-4, keep_logits=False)[0]),
                     ("unfused", lambda: lm_loss((h @ w.T)[None], labels[None], 1e-4)[0])]:
        def step():
            h.grad = None
            w.grad = None
            fn().backward()

        ms = bench(step, warmup=3, rep=20)
        h.grad, w.grad = None, None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        # peak over inputs, minus the two gradients every head produces
        extra = torch.cuda.max_memory_allocated() - base - h.numel() * 2 - w.numel() * 2
        out.append({"op": "linear_ce", "impl": name, "tokens": t, "d": d, "vocab": v, "fwd_bwd_ms": ms,
                    "extra_gb": extra / 1e9, "tflops": 6 * t * d * v / ms / 1e9})
    return out


# (time rows, channels, warps) of the conv1d backward's programs: BENCHMARKS.md, "Where the step went"
CONV_BWD_SWEEP = [(32, 128, 4), (64, 128, 4), (64, 128, 8), (16, 128, 4), (32, 64, 4), (32, 256, 4), (32, 256, 8),
                  (128, 64, 8), (64, 64, 4), (16, 256, 4), (128, 128, 8), (256, 32, 4)]


def sweep_conv_bwd(results: list[dict], l=4096) -> None:
    """The conv1d backward (pre-activation gradient kernel) under each CONV_BWD_SWEEP launch, at Bamba's
    x (8192 channels) and B / C (128), one row of 4096 tokens with 4 documents; outputs checked equal."""
    from hybrid_train.ops.triton import conv1d as conv

    kept = conv._BWD_PRE
    seq_idx = torch.bucketize(torch.arange(l, device="cuda"), torch.tensor([900, 2000, 3100], device="cuda"),
                              right=True).int()[None].contiguous()
    for c in (8192, 128):
        x = torch.randn(1, l, c, device="cuda", dtype=torch.bfloat16)
        w, bias = torch.randn(c, 4, device="cuda") * 0.3, torch.randn(c, device="cuda") * 0.1
        dout = torch.randn(1, l, c, device="cuda", dtype=torch.bfloat16)
        conv._BWD_PRE = kept
        ref = conv.conv1d_bwd(dout, x, w, bias, seq_idx, True)
        for variant in CONV_BWD_SWEEP:
            conv._BWD_PRE = variant
            out = conv.conv1d_bwd(dout, x, w, bias, seq_idx, True)
            same = all(torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-3) for a, b in zip(out, ref))
            ms = bench(lambda: conv.conv1d_bwd(dout, x, w, bias, seq_idx, True))
            results.append({"op": "conv1d_bwd", "channels": c, "launch": variant, "ms": ms, "same": same})
            print(json.dumps(results[-1]), flush=True)
    conv._BWD_PRE = kept


def bench_conv_norm(b=2, l=4096) -> list[dict]:
    from hybrid_train.ops.conv1d import causal_conv1d
    from hybrid_train.ops.norm import gated_rms_norm

    out = []
    c = 8448
    x = torch.randn(b, l, c, device="cuda").bfloat16().requires_grad_(True)
    wc = torch.randn(c, 1, 4, device="cuda").requires_grad_(True)
    bc = torch.randn(c, device="cuda").requires_grad_(True)
    seq_idx = torch.zeros(b, l, device="cuda", dtype=torch.int32)
    seq_idx[:, l // 2:] = 1
    d = 8192
    xn, zn = (torch.randn(b, l, d, device="cuda").bfloat16().requires_grad_(True) for _ in range(2))
    wn = torch.ones(d, device="cuda").requires_grad_(True)
    cases = [
        ("conv1d_silu_seq", lambda: causal_conv1d(x, wc, bc, seq_idx, "silu"), [x, wc, bc], b * l * c * 2 * 2),
        ("gated_norm_g1", lambda: gated_rms_norm(xn, zn, wn, 1e-5, d), [xn, zn, wn], b * l * d * 3 * 2),
        ("gated_norm_g8", lambda: gated_rms_norm(xn, zn, wn, 1e-5, d // 8), [xn, zn, wn], b * l * d * 3 * 2),
    ]
    for name, fn, leaves, nbytes in cases:
        for mode in ("triton", "torch"):
            set_kernels(mode)
            y = fn()
            dy = torch.randn_like(y)
            with torch.no_grad():
                f = bench(fn)
            fb = bench(lambda: torch.autograd.grad(fn(), leaves, dy))
            out.append({"op": name, "impl": mode, "b": b, "l": l, "fwd_ms": f, "fwd_bwd_ms": fb,
                        "fwd_gbps": nbytes / f / 1e6})
    set_kernels("auto")
    return out


def graph_replay_ms(fn) -> float:
    """GPU time of fn alone: fn captured in a CUDA graph, the replay timed (no host launch cost)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench(graph.replay)


def bench_ssd_overhead(b, l, h, p, g, n, chunk) -> dict:
    """Eager forward+backward against its CUDA-graph replay (GPU time alone) and the host time per call;
    the forward's GPU time likewise (``fwd_graph_ms``)."""
    fwd_bwd = warm_ssd_step(b, l, h, p, g, n, chunk)
    eager = bench(fwd_bwd)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        fwd_bwd()
    host = (time.perf_counter() - start) / 20 * 1e3  # enqueue cost per call (no sync inside)
    torch.cuda.synchronize()
    replay = graph_replay_ms(fwd_bwd)
    t, _ = ssd_inputs(b, l, h, p, g, n, grad=False)
    with torch.no_grad():
        fwd_replay = graph_replay_ms(lambda: ssd_call(t, chunk, None))
    set_kernels("auto")
    return {"op": "ssd_overhead", "b": b, "l": l, "g": g, "eager_ms": eager, "graph_ms": replay, "host_ms": host,
            "fwd_graph_ms": fwd_replay}


def host_profile_ssd(b, l, h, p, g, n, chunk, iters=20) -> list[str]:
    """Where the host time of an eager SSD forward+backward goes (cProfile, top functions by own time)."""
    import cProfile
    import io
    import pstats

    step = warm_ssd_step(b, l, h, p, g, n, chunk)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(iters):
        step()
    prof.disable()
    torch.cuda.synchronize()
    set_kernels("auto")
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
    return out.getvalue().splitlines()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=["ssd", "ce", "conv", "norm"])
    parser.add_argument("--reference", action="store_true", help="also time the PyTorch reference path")
    parser.add_argument("--profile", action="store_true", help="per-kernel times of the SSD at the anchor shape")
    parser.add_argument("--sweep", action="store_true", help="try the launch variants in SWEEP at the anchor")
    parser.add_argument("--sweep-fwd", action="store_true", help="forward only: the launch variants in SWEEP_FWD")
    parser.add_argument("--sweep-conv", action="store_true", help="the conv1d backward's launch variants")
    parser.add_argument("--graph", action="store_true",
                        help="SSD fwd+bwd: eager vs CUDA-graph replay, host time; the forward's replay")
    parser.add_argument("--host-profile", action="store_true", help="cProfile of eager SSD fwd+bwd host time")
    parser.add_argument("--json", help="append results as JSON lines to this file")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    results: list[dict] = []
    if args.profile:
        for line in profile_ssd(**ANCHOR):
            print(line, flush=True)
    if args.host_profile:
        for line in host_profile_ssd(**ANCHOR):
            print(line, flush=True)
    if args.sweep:
        sweep_ssd(results)
    if args.sweep_fwd:
        sweep_ssd(results, SWEEP_FWD, fwd_only=True)
    if args.sweep_conv:
        sweep_conv_bwd(results)
    if args.graph:
        for shape in (ANCHOR, dict(ANCHOR, g=8), dict(ANCHOR, b=1, l=2048), dict(ANCHOR, b=1, l=8192),
                      dict(ANCHOR, b=1, l=16384)):
            results.append(bench_ssd_overhead(**shape))
            print(json.dumps(results[-1]), flush=True)
    if "ssd" in args.only:
        ssd_sweep(results, args.reference)
    if "ce" in args.only:
        results += bench_ce()
    if "conv" in args.only or "norm" in args.only:
        results += bench_conv_norm()
    meta = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__}
    for r in results:
        r.update(meta)
    if args.json:
        with open(args.json, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    for line in kernel_resources():
        print(line)
    print(f"\n{meta}")
    for r in results:
        if r["op"] == "ssd":
            ratio = f" (mamba_ssm anchor {MAMBA_SSM_MS['fwd']}/{MAMBA_SSM_MS['fwd_bwd']} ms)" if (
                r["b"], r["l"], r["g"], r.get("docs", 1)) == (2, 4096, 1, 1) else ""
            print(f"ssd {r['impl']:6s} b{r['b']} l{r['l']:5d} g{r['g']} docs{r['docs']}: fwd {r['fwd_ms']:.3f} ms "
                  f"({r['fwd_tflops']:.0f} TFLOP/s, {r['fwd_gbps']:.0f} GB/s)  fwd+bwd {r['fwd_bwd_ms']:.3f} ms "
                  f"({r['fwd_bwd_tflops']:.0f} TFLOP/s){ratio}")
        elif r["op"] in ("ssd_sweep", "conv1d_bwd"):
            continue  # printed by the sweep
        elif r["op"] == "ssd_overhead":
            print(f"ssd fwd+bwd b{r['b']} l{r['l']:5d} g{r['g']}: eager {r['eager_ms']:.3f} ms, CUDA graph "
                  f"{r['graph_ms']:.3f} ms, host {r['host_ms']:.3f} ms per call; forward alone, CUDA graph "
                  f"{r['fwd_graph_ms']:.3f} ms")
        elif r["op"] == "linear_ce":
            print(f"linear+CE {r['impl']:8s} t{r['tokens']} d{r['d']} V{r['vocab']}: fwd+bwd {r['fwd_bwd_ms']:.2f} ms "
                  f"({r['tflops']:.0f} TFLOP/s of the 3 unfused matmuls), extra memory {r['extra_gb']:.2f} GB")
        else:
            print(f"{r['op']:16s} {r['impl']:6s} b{r['b']} l{r['l']}: fwd {r['fwd_ms']:.3f} ms "
                  f"({r['fwd_gbps']:.0f} GB/s)  fwd+bwd {r['fwd_bwd_ms']:.3f} ms")



def kernel_resources() -> list[str]:
    """Registers and spills of every compiled Triton kernel of this package (triton 3.x caches)."""
    import sys

    lines = []
    for name, mod in list(sys.modules.items()):
        if not name.startswith("hybrid_train.ops.triton.") or mod is None:
            continue
        for attr, fn in vars(mod).items():
            caches = getattr(fn, "device_caches", None)
            if not caches:
                continue
            for dev_cache in caches.values():
                kernels = dev_cache[0] if isinstance(dev_cache, tuple) else dev_cache
                for k in getattr(kernels, "values", lambda: [])():
                    lines.append(f"{attr}: regs {getattr(k, 'n_regs', '?')} spills {getattr(k, 'n_spills', '?')} "
                                 f"shared {getattr(k, 'metadata', None) and getattr(k.metadata, 'shared', '?')}")
    return lines


if __name__ == "__main__":
    main()
