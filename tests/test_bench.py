"""scripts/bench.py: the saved-tensor byte count it reports, and a CPU smoke run of the kernel ladder."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from hybrid_train.ops.dispatch import OPS

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_bench():
    return load_script("bench")


def test_saved_bytes_counts_each_storage_once_and_skips_parameters():
    bench = load_bench()
    w = torch.nn.Parameter(torch.randn(8, 8))
    u = torch.randn(4, 8)
    with bench.SavedBytes([w]) as saved:
        h = u @ w  # saves u (for w's gradient) and w, a parameter
        out = h.sin() + h[:2].cos().sum()  # both save h's storage, one a view of it
        dropped = (h * 3).exp()  # saves its output, freed with the branch below
        del dropped
    assert saved.bytes == u.nbytes + h.nbytes
    out.sum().backward()


def test_bench_ladder_smoke_on_cpu(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "bench.jsonl"
    bench = load_bench()
    results = bench.main(["--device", "cpu", "--tiny", "--ladder", "--layers", "2", "--attn", "1",
                          "--seq-len", "32", "--steps", "1", "--warmup", "0", "--documents", "2", "--json", str(out)])
    assert [r["variant"] for r in results] == ["reference", "+ssd", "+conv1d", "+gated_norm", "+rms_norm", "+mixer",
                                              "+swiglu"]
    assert set(bench.MODEL_OPS) == set(OPS) - {"sum_squares"}  # every op of the model, not the gradient norm's
    assert results[0]["torch_ops"] == list(bench.MODEL_OPS) and results[-1]["torch_ops"] == ["cross_entropy"]
    # on CPU without the interpreter every variant runs the reference: the same bytes saved
    assert len({r["act_bytes_per_token"] for r in results}) == 1 and results[0]["act_bytes_per_token"] > 0
    assert all(r["tokens_per_s"] > 0 and r["act_alloc_bytes_per_token"] is None for r in results)
    assert [json.loads(line)["variant"] for line in out.read_text().splitlines()] == [r["variant"] for r in results]


def test_bench_fused_loss_adds_the_cross_entropy_step(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    bench = load_bench()
    assert [name for name, _ in bench.variants(True, True)][-2:] == ["+swiglu", "+cross_entropy"]
    assert bench.variants(True, True)[-1][1] == ()
    results = bench.main(["--device", "cpu", "--tiny", "--layers", "1", "--attn", "--seq-len", "16",
                          "--steps", "1", "--warmup", "0", "--fused-loss"])
    assert [r["variant"] for r in results] == ["kernels"] and results[0]["fused_loss"]


def test_bench_master_weights_runs_the_trainers_precision(monkeypatch):
    """--master-weights: autocast on bf16 weights with split fp32 masters (CPU: without the optimizer, whose
    Triton step updates them; asked for on CPU without the interpreter, a clear error)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    bench = load_bench()
    args = ["--device", "cpu", "--tiny", "--layers", "1", "--attn", "--seq-len", "16", "--steps", "1", "--warmup", "1",
            "--master-weights", "--fused-loss"]
    (result,) = bench.main(args)
    assert result["master_weights"] and result["step_ms"] > 0
    with pytest.raises(SystemExit):
        bench.main(args + ["--optimizer"])


def test_bench_train_runs_the_trainer_and_reports_its_split(tmp_path):
    """scripts/bench_train.py: real trainer steps with Hydra overrides, steady state after the warm-up."""
    module = load_script("bench_train")
    out = tmp_path / "bench_train.jsonl"
    result = module.main(["--steps", "4", "--warmup", "2", "--window", "2", "--json", str(out), "train.seq_len=32",
                          "train.micro_batch_size=2", "model.n_layers=2", "model.attn_layer_indices=[1]",
                          f"run.dir={tmp_path / 'run'}"])
    assert result["measured_steps"] == 2 and result["steps"] == 4
    assert result["tokens_per_s"] == pytest.approx(2 * 32 / (result["step_ms"] / 1e3), rel=1e-6)  # 64 tokens a step
    assert set(result["time_ms"]) >= {"forward", "backward", "optimizer", "host"}
    assert [s for s, _ in result["losses"]] == [2, 4]
    assert json.loads(out.read_text())["tokens_per_s"] == result["tokens_per_s"]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bench_optimizer_times_each_impl_on_cpu(tmp_path, capsys):
    """scripts/bench_optimizer.py: the AdamW step alone per optim.impl, on the model's parameter shapes."""
    module = load_script("bench_optimizer")
    out = tmp_path / "optim.jsonl"
    argv = ["bench_optimizer.py", "--device", "cpu", "--steps", "1", "--impls", "fused,loop", "--json", str(out),
            "model=tiny"]
    old, sys.argv = sys.argv, argv
    try:
        module.main()
    finally:
        sys.argv = old
    result = json.loads(out.read_text())
    from hybrid_train.config import load_config
    from hybrid_train.model import build_model

    n = sum(p.numel() for p in build_model(load_config(["model=tiny"]).model).parameters())
    assert result["params"] == n and result["overrides"] == ["model=tiny"]
    assert result["fused"]["ms"] > 0 and result["loop"]["GB_per_s"] > 0
    assert result["bytes_per_step"] == 28 * n  # fp32 parameters, gradients and moments
    assert result["norm_torch"]["ms"] > 0 and "norm_triton" not in result  # (CPU: no Triton sum of squares)
    assert "fused" in capsys.readouterr().out
    for impls, message in (("triton,fused", None), ("auto", "--bf16-weights with optim.impl=auto: .*Triton AdamW")):
        sys.argv = ["bench_optimizer.py", "--device", "cpu", "--steps", "1", "--impls", impls, "--bf16-weights",
                    "model=tiny"]
        try:  # refused before anything is timed (auto: torch's AdamW on CPU)
            with pytest.raises(SystemExit, match=message):
                module.main()
        finally:
            sys.argv = old
    assert "split fp32 masters are stepped by the Triton AdamW only" in capsys.readouterr().err


def test_bench_moe_slice_smoke_on_cpu(monkeypatch):
    """--moe: the grouped-GEMM experts and the loop-over-experts baseline, MFU on active parameters."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    results = load_bench().main(["--device", "cpu", "--tiny", "--moe", "--layers", "2", "--attn", "0",
                                 "--seq-len", "16", "--steps", "1", "--warmup", "0"])
    assert [r["variant"] for r in results] == ["moe_grouped", "moe_loop"]
    grouped, loop = results
    assert grouped["moe_grouped_mm"] == hasattr(torch, "_grouped_mm") and loop["moe_grouped_mm"] is False
    assert grouped["active_params"] == grouped["params"] - (8 - 2) * 3 * 64 * 64  # one MoE block (index 1)
    assert all(r["tokens_per_s"] > 0 for r in results)


def test_kernel_kinds_of_real_kernel_names():
    from hybrid_train.train.profile import kernel_kind, summarize

    names = {  # as an H200 profile of the 9B-width step names them
        "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT": "matmul",
        "_adamw_kernel": "Triton (this project)",
        "_conv_bwd_pre_kernel": "Triton (this project)",
        "triton_poi_fused__unsafe_view_mul_silu_silu_backward_view_1": "compiled (inductor)",
        "triton_tem_fused_flex_attention_backward_transpose_view_4": "attention",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>": "elementwise",
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::NormTwoOps<float>>>":
            "reduction / norm",
        "Memset (Device)": "memcpy / memset",
        "ncclDevKernel_AllGather_RING_LL": "communication",
    }
    assert {n: kernel_kind(n) for n in names} == names
    lines = summarize([("nvjet_a", 3000.0), ("nvjet_a", 1000.0), ("_adamw_kernel", 2000.0)], steps=2)
    assert "3.0 ms of kernels a step" in lines[0]
    assert lines[1].split()[0] == "matmul" and "2.00 ms" in lines[1] and "66.7%" in lines[1]
    assert "nvjet_a" in lines[4] and "2.00 ms" in lines[4] and " 1.0 " in lines[4]  # 2 launches over 2 steps


def test_bench_train_profiles_steps_after_the_measured_ones(tmp_path):
    """--profile K runs the last K steps under torch.profiler: a trace and a summary in run.dir/profile,
    the steady state taken from the steps before them, the run (and its schedule) as without it."""
    module = load_script("bench_train")
    run_dir = tmp_path / "run"
    common = ["--steps", "6", "--warmup", "2", "--window", "2", "train.seq_len=32", "train.micro_batch_size=2",
              f"data.root={REPO / 'data' / 'sample'}"]
    out = module.main(common + ["--profile", "2", f"run.dir={run_dir}"])
    assert out["steps"] == 6 and out["measured_steps"] == 2  # the window of steps 3-4; 5-6 were profiled
    assert out["losses"] == module.main(common + [f"run.dir={tmp_path / 'plain'}"])["losses"]
    traces = list((run_dir / "profile").glob("rank0_steps5-6.json.gz"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    summary = (run_dir / "profile" / "summary.txt").read_text()
    assert "aten::mm" in summary and out["profile"] == summary.splitlines()
    assert "profiled steps 5-6" in (run_dir / "train.log").read_text()


def test_bench_train_refuses_a_run_with_no_measured_window_before_training(capsys):
    module = load_script("bench_train")
    with pytest.raises(SystemExit):
        module.main(["--steps", "8", "--warmup", "4", "--window", "4", "--profile", "3"])
    assert "no logged window ends after --warmup 4 and by step 5" in capsys.readouterr().err
