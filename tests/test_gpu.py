"""GPU checks (`pytest -m gpu`); skipped where no CUDA device is present."""

import pytest
import torch

from hybrid_train.ops import causal_attention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_flex_document_attention_matches_dense_mask():
    torch.manual_seed(0)
    b, hq, hkv, t, d = 2, 8, 2, 1024, 64
    q, k, v = (torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16) for h in (hq, hkv, hkv))
    bounds = torch.tensor([100, 517, 518, 900], device="cuda")
    seq_idx = torch.bucketize(torch.arange(t, device="cuda"), bounds, right=True).int().expand(b, t).contiguous()
    out = causal_attention(q, k, v, seq_idx)  # FlexAttention on CUDA
    ref = causal_attention(q.cpu().double(), k.cpu().double(), v.cpu().double(), seq_idx.cpu())  # dense mask
    err = (out.double().cpu() - ref).norm() / ref.norm()
    assert err < 1e-2, err
    # A new batch's documents get a new mask (the block mask is cached per seq_idx tensor only).
    other = torch.bucketize(torch.arange(t, device="cuda"), bounds[:2], right=True).int().expand(b, t).contiguous()
    out2 = causal_attention(q, k, v, other)
    ref2 = causal_attention(q.cpu().double(), k.cpu().double(), v.cpu().double(), other.cpu())
    assert (out2.double().cpu() - ref2).norm() / ref2.norm() < 1e-2


def test_train_steps_on_gpu(compose, tmp_path):
    import json

    from hybrid_train.train.trainer import train

    job = compose([f"run.dir={tmp_path}", "train.max_tokens=0", "train.max_steps=20", "logging.log_every=5",
                       "logging.progress=false", "logging.peak_tflops=989"])
    train(job)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[-1]["mfu"] is not None and records[-1]["mem_gb"] > 0
