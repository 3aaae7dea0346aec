"""MoE models and transformers' GraniteMoeHybridForCausalLM: export (logit parity, with and without a shared
expert), import (identity on every tensor, and of a model transformers saved itself), refusals by name,
and merging MoE checkpoints."""

import json

import pytest
import torch

from hybrid_train import load_model
from hybrid_train.model import ModelConfig, build_model
from hybrid_train.model.hf import HFCheckpoint
from hybrid_train.train.export import NativeCheckpoint, export_hf, import_hf
from hybrid_train.train.merge import MergeSpec, merge
from test_interop import saved_model

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
              pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")]


def granite_cfg(**overrides) -> ModelConfig:
    base = dict(name="g", vocab_size=97, d_model=64, n_layers=3, attn_layer_indices=[1], mlp_hidden=0,
                n_heads=4, n_kv_heads=2, head_dim=16, partial_rotary_factor=1.0, ssm_d_state=8, ssm_head_dim=16,
                ssm_n_groups=2, ssm_chunk_size=8, moe_n_experts=6, moe_top_k=2, moe_hidden=32,
                moe_shared_hidden=48)
    base.update(overrides)
    return ModelConfig(**base).validate()


def granite_logits_match(hf_dir, ckpt, vocab: int, length: int = 29) -> None:
    hf, info = transformers.GraniteMoeHybridForCausalLM.from_pretrained(hf_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids = torch.randint(0, vocab, (2, length))
    with torch.no_grad():
        theirs = hf.float().eval()(ids, use_cache=False).logits
        ours = load_model(ckpt)(ids)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("overrides", [
    dict(),  # shared expert, 2 groups, attention at 1
    dict(moe_shared_hidden=0, tie_embeddings=True, ssm_n_groups=1),  # no shared expert
    dict(moe_top_k=1, moe_n_experts=4, attn_layer_indices=[0, 2], rope_theta=500.0, ssm_conv_bias=False,
         ssm_dt_limit=[0.01, 0.2]),
    # Granite 4.0-H's attention and scalars: no positional encoding, score scale 1/head_dim, multipliers.
    dict(attn_rope=False, attn_scale=1 / 16, embedding_multiplier=12.0,
         residual_multiplier=0.22, logits_scaling=6.0, tie_embeddings=True),
])
def test_moe_export_loads_in_transformers_granite_with_equal_logits(tmp_path, overrides):
    cfg = granite_cfg(**overrides)
    ckpt = saved_model(tmp_path / "ckpt", cfg)
    export_hf(ckpt, tmp_path / "hf", max_shard_size=60_000)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "granitemoehybrid" and config["shared_intermediate_size"] == cfg.moe_shared_hidden
    names = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.block_sparse_moe.input_linear.weight" in names  # the released checkpoints' names
    granite_logits_match(tmp_path / "hf", ckpt, cfg.vocab_size)

    # Import: every tensor back unchanged, the config back up to the unused dense width.
    back = import_hf(tmp_path / "hf", tmp_path / "back")
    a, b = NativeCheckpoint(ckpt), NativeCheckpoint(back)
    assert sorted(a.names()) == sorted(b.names())
    for name in a.names():
        assert torch.equal(a.tensor(name), b.tensor(name)), name
    assert b.model_config == ModelConfig(**{**vars(cfg), "name": "hf", "moe_aux_loss_coef": cfg.moe_aux_loss_coef})


def test_import_of_a_model_saved_by_transformers(tmp_path):
    """transformers 5 saves the experts under its module names (experts.gate_up_proj, router.weight); the
    import reads those too, and the imported model computes transformers' logits."""
    hf_cfg = transformers.GraniteMoeHybridConfig(
        vocab_size=97, hidden_size=64, intermediate_size=32, shared_intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["mamba", "attention"], mamba_n_heads=8, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1,
        mamba_chunk_size=8, position_embedding_type="nope", attention_multiplier=1 / 16, rms_norm_eps=1e-5,
        embedding_multiplier=12.0, residual_multiplier=0.22, logits_scaling=6.0)  # Granite 4.0-H's kind
    torch.manual_seed(0)
    hf = transformers.GraniteMoeHybridForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path / "hf")
    ckpt = import_hf(tmp_path / "hf", tmp_path / "native")
    ids = torch.randint(0, 97, (2, 21))
    with torch.no_grad():
        torch.testing.assert_close(load_model(ckpt)(ids), hf(ids, use_cache=False).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("overrides, words", [
    (dict(moe_every=2, moe_offset=1, mlp_hidden=32), "dense MLP in blocks [0, 2]"),
    (dict(moe_score="sigmoid"), "moe_score='sigmoid'"),
    (dict(moe_norm_topk=False), "moe_norm_topk=false"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
    (dict(head_dim=8), "head_dim=8 x n_heads=4 != d_model=64"),
])
def test_unsupported_moe_configs_are_refused_by_name(tmp_path, overrides, words):
    ckpt = saved_model(tmp_path / "ckpt", granite_cfg(**overrides))
    with pytest.raises(ValueError, match="cannot be expressed as a transformers GraniteMoeHybrid model") as err:
        export_hf(ckpt, tmp_path / "hf")
    assert words in str(err.value)
    assert not (tmp_path / "hf").exists()


def test_import_refuses_what_this_model_cannot_express(tmp_path):
    ckpt = saved_model(tmp_path / "ckpt", granite_cfg())
    export_hf(ckpt, tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    config = json.loads(path.read_text())
    for key, value, words in [("position_embedding_type", "alibi", "position_embedding_type='alibi'"),
                              ("hidden_act", "gelu", "hidden_act='gelu'"),
                              ("num_local_experts", 0, "num_local_experts=0")]:
        path.write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError, match="GraniteMoeHybrid config of 'hf' is not supported") as err:
            HFCheckpoint(tmp_path / "hf")
        assert words in str(err.value)


def test_multipliers_and_nope_are_refused_by_the_bamba_export(tmp_path):
    from test_model import tiny_cfg

    ckpt = saved_model(tmp_path / "ckpt", tiny_cfg(attn_rope=False, logits_scaling=2.0))
    with pytest.raises(ValueError, match="cannot be expressed as a transformers Bamba model") as err:
        export_hf(ckpt, tmp_path / "hf")
    assert "attn_rope=false" in str(err.value) and "logits_scaling=2.0" in str(err.value)


def test_merge_of_moe_checkpoints(tmp_path):
    cfg = granite_cfg()
    a, b = saved_model(tmp_path / "a", cfg, seed=0), saved_model(tmp_path / "b", cfg, seed=1)
    out = merge(MergeSpec(models=[str(a), str(b)], weights=[1.0, 3.0]), out=tmp_path / "m", out_hf=tmp_path / "m_hf")
    merged, sa, sb = NativeCheckpoint(out["checkpoint"]), NativeCheckpoint(a), NativeCheckpoint(b)
    for name in ("layers.0.mlp.experts.gate_up_proj", "layers.2.mlp.router.weight"):
        torch.testing.assert_close(merged.tensor(name), 0.25 * sa.tensor(name) + 0.75 * sb.tensor(name))
    granite_logits_match(out["hf"], out["checkpoint"], cfg.vocab_size)
    # Different expert counts do not merge.
    c = saved_model(tmp_path / "c", granite_cfg(moe_n_experts=8))
    with pytest.raises(ValueError, match="moe_n_experts: 6 -> 8"):
        merge(MergeSpec(models=[str(a), str(c)], weights=[1.0, 1.0]), out=tmp_path / "bad")
    assert build_model(cfg, device="meta")  # the merged config builds
