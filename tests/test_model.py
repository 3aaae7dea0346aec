"""Model: parameter counts on meta, packed-document isolation, attention masking, the fused head loss, parity
with transformers."""

import math

import pytest
import torch
import torch.nn.functional as F

from hybrid_train.model import ModelConfig, build_model, count_params
from hybrid_train.model.hf import hf_bamba_config, to_hf_tensors
from hybrid_train.ops import causal_attention, fused_linear_cross_entropy
from hybrid_train.train.loss import lm_loss


def tiny_cfg(**overrides) -> ModelConfig:
    base = dict(name="t", vocab_size=97, d_model=64, n_layers=4, attn_layer_indices=[1], mlp_hidden=96,
                n_heads=4, n_kv_heads=2, head_dim=16, ssm_d_state=8, ssm_head_dim=16, ssm_n_groups=2,
                ssm_chunk_size=8)
    base.update(overrides)
    return ModelConfig(**base)


def test_bamba_9b_parameter_count_on_meta(compose):
    job = compose(["model=bamba_9b"])
    model = build_model(job.model, device="meta")
    total, embedding = count_params(model)
    assert abs(total / 9.78e9 - 1) < 0.005, total
    assert embedding == 128256 * 4096
    assert model.cfg.layer_types.count("A") == 3 and model.cfg.ssm_n_heads == 128
    mixer = model.layers["0"].mixer
    in_proj_rows = sum(p.weight.shape[0] for p in mixer.in_proj.values())
    assert in_proj_rows == 16768  # [z | x | B | C | dt] as in FACTS
    assert sum(c.weight.shape[0] for c in mixer.conv1d.values()) == 8448


def test_build_model_from_python_composition():
    """The Python path: compose conf/ (as train.py does) -> build -> forward, from a JobConfig, Hydra's
    own DictConfig (composed with the schemas registered), its `model` node, or a plain dict."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import hybrid_train
    from conftest import CONF

    job = hybrid_train.load_config(["model.d_model=64", "model.n_layers=2", "model.attn_layer_indices=[1]"])
    with initialize_config_dir(config_dir=str(CONF), version_base=None):  # load_config registered the schemas
        cfg = compose(config_name="config", overrides=["model.d_model=64"])
    ids = torch.tensor([[72, 105]])
    for source in (job, job.model, cfg, cfg.model, OmegaConf.to_container(cfg.model), {"n_layers": 2}):
        model = hybrid_train.build_model(source)
        assert model(ids).shape == (1, 2, 258)
    assert hybrid_train.build_model({"n_layers": "2", "attn_layer_indices": [1]}).cfg.layer_types == ["M", "A"]
    with pytest.raises(ValueError, match="'d_modle'.*did you mean d_model\\?"):
        hybrid_train.build_model({"d_modle": 64})
    with pytest.raises(ValueError, match="n_heads=4 is not divisible by model.n_kv_heads=3"):
        hybrid_train.build_model({"n_kv_heads": 3, "attn_layer_indices": [1]})


def test_logits_shape_and_dtype():
    model = build_model(tiny_cfg())
    ids = torch.randint(0, 97, (2, 21))
    logits = model(ids)
    assert logits.shape == (2, 21, 97) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("tied", [False, True])
def test_fused_head_loss_and_gradients_match_logits_path(tied):
    """With labels the head returns lm_loss of its logits, computed fused: the same loss and cross
    entropy, and the same gradient of every parameter (tied: the one matrix's embedding + head gradient)."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(tie_embeddings=tied, init_std=0.1))  # logits of order 1, not near 0
    ids, labels = torch.randint(0, 97, (2, 2, 21))
    labels[0, :3] = -100  # ignored by both (F.cross_entropy's default ignore_index)
    z_loss = 1e-2
    loss, ce = lm_loss(model(ids), labels, z_loss)
    loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    fused, fused_ce = model(ids, labels=labels, z_loss=z_loss)
    fused.backward()
    torch.testing.assert_close(fused, loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(fused_ce, ce, rtol=1e-6, atol=0)
    assert fused_ce < fused  # the z-loss term is in the loss, not in the cross entropy
    assert fused_ce.grad_fn is None and not fused_ce.requires_grad  # a logged value: holds no graph
    for name, p in model.named_parameters():
        g = expected[name]
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-5 * float(g.abs().max()), msg=name)


def test_fused_loss_under_autocast_is_the_fused_loss_of_autocast_dtype_operands():
    """Under autocast (the trainer's bf16) the fused loss casts hidden and weight as an nn.Linear head
    would, and its backward, which autocast never reaches, recomputes the logits in that dtype too."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(40, 32, generator=gen, requires_grad=True)
    w = (0.3 * torch.randn(300, 32, generator=gen)).requires_grad_(True)
    labels = torch.randint(0, 300, (40,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = fused_linear_cross_entropy(h, w, labels, z_loss=1e-2, vocab_chunk=128)
    loss.backward()
    h16, w16 = (t.detach().bfloat16().requires_grad_(True) for t in (h, w))
    expected, _ = fused_linear_cross_entropy(h16, w16, labels, z_loss=1e-2, vocab_chunk=128)
    expected.backward()
    assert loss.item() == expected.item()
    assert torch.equal(h.grad, h16.grad.float()) and torch.equal(w.grad, w16.grad.float())


def _head_case(t=50, d=32, v=1000, seed=9):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(t, d, generator=gen, dtype=torch.float64)
    w = torch.randn(v, d, generator=gen, dtype=torch.float64) * 0.3
    labels = torch.randint(0, v, (t,), generator=gen)
    labels[3] = -100
    return h, w, labels


@pytest.mark.parametrize("how", [dict(keep_logits=True), dict(keep_logits=False, vocab_chunk=300), {}])
def test_fused_loss_with_kept_or_recomputed_logits_matches_float64_lm_loss(how):
    """Kept logits (one head matmul each way), ragged recomputed chunks, and the default (kept at this
    size) all give lm_loss's value and gradients in float64 to fp32 accuracy."""
    h, w, labels = _head_case()
    h32, w32 = h.float().requires_grad_(True), w.float().requires_grad_(True)
    loss, ce = fused_linear_cross_entropy(h32, w32, labels, z_loss=1e-2, **how)
    (2.5 * loss).backward()  # a non-unit upstream gradient (grad accumulation divides the loss)
    h64, w64 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref, ce_ref = lm_loss((h64 @ w64.T)[None], labels[None], 1e-2)
    (2.5 * ref).backward()
    assert abs(loss.item() - ref.item()) < 1e-5 and abs(ce.item() - ce_ref.item()) < 1e-5
    for out, expected in ((h32.grad, h64.grad), (w32.grad, w64.grad)):
        assert (out.double() - expected).norm() / expected.norm() < 1e-5


def _count_matmuls(fn) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.mm.out, torch.ops.aten.addmm.default):
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def test_kept_logits_on_the_pytorch_path_make_fp32_temporaries_a_chunk_at_a_time(monkeypatch):
    """bf16 logits kept whole, their fp32 passes (stats, gradient) over 1024-column slices: 3 ragged
    passes at a 3000 vocabulary, float64 lm_loss's values and gradients to bf16 accuracy."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from hybrid_train.ops import cross_entropy

    monkeypatch.setattr(cross_entropy, "_CHUNK_BYTES", 1)  # the smallest chunk: 1024 columns
    h, w, labels = _head_case(v=3000)
    widest = []

    class Widest(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.exp.default and out.dtype == torch.float32 and out.dim() == 2:
                widest.append(out.shape[1])
            return out

    hb, wb = (t.bfloat16().requires_grad_(True) for t in (h, w))
    with Widest():
        loss, _ = fused_linear_cross_entropy(hb, wb, labels, z_loss=1e-2, keep_logits=True)
        loss.backward()
    assert sorted(set(widest)) == [952, 1024]
    h64, w64 = (t.bfloat16().double().requires_grad_(True) for t in (h, w))
    ref, _ = lm_loss((h64 @ w64.T)[None], labels[None], 1e-2)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 2e-2
    for out, expected in ((hb.grad, h64.grad), (wb.grad, w64.grad)):
        assert (out.double() - expected).norm() / expected.norm() < 2e-2


def test_kept_logits_take_one_head_matmul_less_and_allow_one_backward(monkeypatch):
    """Kept: 1 matmul forward + 2 backward (an unfused head's 3); 4 recomputed chunks: 4 + 3 x 4. Over the
    byte budget the default recomputes. The kept logits become the gradient: a second backward is refused."""
    from hybrid_train.ops import cross_entropy

    h, w, labels = _head_case()

    def run(**how):
        hh, ww = h.float().requires_grad_(True), w.float().requires_grad_(True)
        return lambda: fused_linear_cross_entropy(hh, ww, labels, **how)[0].backward()

    assert _count_matmuls(run(keep_logits=True)) == 3
    assert _count_matmuls(run()) == 3
    assert _count_matmuls(run(vocab_chunk=250)) == 16
    monkeypatch.setattr(cross_entropy, "_KEEP_LOGITS_BYTES", 50 * 1000 * 4 - 1)  # fp32 logits: one byte over
    assert _count_matmuls(run()) > 3
    hh, ww = h.float().requires_grad_(True), w.float().requires_grad_(True)
    loss, _ = fused_linear_cross_entropy(hh, ww, labels, keep_logits=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="keep_logits=False"):
        loss.backward()


@pytest.mark.parametrize("layout", [dict(attn_layer_indices=[1]), dict(attn_layer_indices=None, layer_pattern="AMMA")])
def test_packed_documents_do_not_see_each_other(layout):
    """Logits of documents packed in one row with seq_idx equal those of each document alone."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(**layout)).double()
    lengths = [5, 11, 9, 3]  # boundaries fall inside and on chunk edges (chunk 8)
    docs = [torch.randint(0, 97, (1, n)) for n in lengths]
    packed = torch.cat(docs, dim=1)
    seq_idx = torch.cat([torch.full((1, n), i, dtype=torch.int32) for i, n in enumerate(lengths)], dim=1)
    position_ids = torch.cat([torch.arange(n)[None] for n in lengths], dim=1)
    packed_logits = model(packed, position_ids, seq_idx)
    alone = torch.cat([model(d) for d in docs], dim=1)
    torch.testing.assert_close(packed_logits, alone, rtol=1e-9, atol=1e-9)
    # Without the document boundaries, later documents do see earlier ones.
    assert not torch.allclose(model(packed), alone, atol=1e-6)


def test_causal_attention_document_mask_matches_per_document_reference():
    torch.manual_seed(1)
    b, hq, hkv, t, d = 2, 4, 2, 13, 8
    q, k, v = (torch.randn(b, h, t, d, dtype=torch.float64) for h in (hq, hkv, hkv))
    seq_idx = torch.tensor([[0] * 4 + [1] * 6 + [2] * 3, [0] * 13], dtype=torch.int32)
    out = causal_attention(q, k, v, seq_idx)
    ref = torch.empty_like(out)
    kr, vr = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    for i in range(b):
        for doc in seq_idx[i].unique():
            sel = (seq_idx[i] == doc).nonzero().flatten()
            s = q[i][:, sel] @ kr[i][:, sel].transpose(-1, -2) / math.sqrt(d)
            s = s.masked_fill(~torch.ones(len(sel), len(sel), dtype=torch.bool).tril(), float("-inf"))
            ref[i][:, sel] = s.softmax(-1) @ vr[i][:, sel]
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(ssm_n_groups=1, attn_layer_indices=[0, 3], tie_embeddings=True),
    dict(ssm_dt_limit=[0.01, 0.2], ssm_conv_bias=False, ssm_chunk_size=16),
])
def test_logits_match_transformers_bamba(overrides):
    """An independent implementation: transformers' BambaForCausalLM (its no-kernel path) on the same weights."""
    transformers = pytest.importorskip("transformers")
    cfg = tiny_cfg(**overrides)
    torch.manual_seed(2)
    model = build_model(cfg).double()
    with torch.no_grad():  # move away from init values so every tensor's role is exercised
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf_cfg = transformers.BambaConfig(**{k: v for k, v in hf_bamba_config(cfg).items() if k not in ("architectures", "model_type")})
    hf = transformers.BambaForCausalLM(hf_cfg).double().eval()
    missing, unexpected = hf.load_state_dict(dict(to_hf_tensors(cfg, model.state_dict())), strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if cfg.tie_embeddings else set())
    ids = torch.randint(0, cfg.vocab_size, (2, 37))  # not a multiple of the chunk
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(ids, use_cache=False).logits
    # Both compute A = -exp(A_log) in fp32, hence fp32-level agreement despite float64 weights.
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_no_parallelism_imports_in_model_and_ops():
    import pathlib

    root = pathlib.Path(__file__).parents[1] / "hybrid_train"
    for room in ("model", "ops"):
        for path in (root / room).glob("*.py"):
            assert "torch.distributed" not in path.read_text(), path


def test_mamba_init_ranges():
    cfg = tiny_cfg(n_layers=2, attn_layer_indices=[])
    model = build_model(cfg)
    mixer = model.layers["0"].mixer
    dt = F.softplus(mixer.dt_bias)
    assert (dt >= cfg.ssm_dt_init_floor - 1e-7).all() and (dt <= cfg.ssm_dt_max + 1e-6).all()
    A = mixer.A_log.exp()
    assert (A >= 1).all() and (A <= 16).all()
    assert torch.equal(mixer.D, torch.ones_like(mixer.D))
