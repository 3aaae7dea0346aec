"""Hugging Face interop: export to transformers' Bamba (logit parity, sharding, streaming, tokenizer),
import back (identity on every tensor), unsupported configs, the scripts, and held-out evaluation."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import CONF, REPO, LiveTensors, compose_job
from hybrid_train import load_model
from hybrid_train.model import ModelConfig, build_model
from hybrid_train.model.hf import HFCheckpoint, load_hf_checkpoint, native_shapes
from hybrid_train.train.checkpoint import write_model_checkpoint
from hybrid_train.train.export import NativeCheckpoint, export_hf, import_hf, write_native_checkpoint
from test_model import tiny_cfg

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def saved_model(path: Path, cfg: ModelConfig, seed: int = 0) -> Path:
    """A checkpoint of a randomly initialized model, moved off its init values."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return write_model_checkpoint(path, model.state_dict(), cfg)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hf_logits_match(hf_dir: Path, ckpt: Path, vocab: int, length: int = 37) -> None:
    hf, info = transformers.BambaForCausalLM.from_pretrained(hf_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert hf.dtype == torch.float32
    ids = torch.randint(0, vocab, (2, length))
    with torch.no_grad():
        theirs = hf.eval()(ids, use_cache=False).logits
        ours = load_model(ckpt)(ids)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("overrides", [
    dict(),  # n_groups 2, attention at 1
    dict(ssm_n_groups=1, attn_layer_indices=[0, 3], tie_embeddings=True),
    dict(n_layers=3, attn_layer_indices=[2], ssm_proj_bias=True, ssm_conv_bias=False, ssm_dt_limit=[0.01, 0.2],
         ssm_chunk_size=16, rope_theta=500.0),
    dict(n_layers=2, attn_layer_indices=[], head_dim=8),  # Mamba-2 only: the attention shape is free
    dict(n_layers=2, attn_layer_indices=None, layer_pattern="AA"),  # attention only
])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, overrides):
    cfg = tiny_cfg(**overrides)
    ckpt = saved_model(tmp_path / "ckpt", cfg)
    max_shard = 40_000
    result = export_hf(ckpt, tmp_path / "hf", max_shard_size=max_shard)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert result.shards == len(shards) > 1 and all((tmp_path / "hf" / s).is_file() for s in shards)
    # Streaming: the writer never held more than a shard (or one tensor larger than a shard).
    largest = max(s.numel() * 4 for s in native_shapes(cfg).values()) * 5  # in_proj = up to 5 pieces
    assert result.peak_bytes <= max(max_shard, largest)
    assert result.peak_bytes < result.total_bytes / 2
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key in ("mamba_d_state", "mamba_n_groups", "vocab_size", "time_step_limit", "attn_layer_indices",
                "tie_word_embeddings", "rope_parameters", "mamba_chunk_size"):
        assert key in config, key  # never left to BambaConfig's defaults
    assert (tmp_path / "hf" / "generation_config.json").is_file()
    hf_logits_match(tmp_path / "hf", ckpt, cfg.vocab_size, length=37 if cfg.ssm_chunk_size == 8 else 21)


def test_import_inverts_export_and_streams(tmp_path):
    cfg = tiny_cfg(tie_embeddings=True)
    ckpt = saved_model(tmp_path / "ckpt", cfg)
    export_hf(ckpt, tmp_path / "hf", max_shard_size=30_000)

    # The native writer holds about one tensor at a time: count live tensors handed out by the source.
    source = HFCheckpoint(tmp_path / "hf")
    tracker = LiveTensors(source)
    imported = write_native_checkpoint(tmp_path / "imported", source)
    assert tracker.peak <= 2, tracker.peak

    a, b = NativeCheckpoint(ckpt), NativeCheckpoint(imported)
    assert sorted(a.names()) == sorted(b.names())
    for name in a.names():
        assert torch.equal(a.tensor(name), b.tensor(name)), name
    assert b.model_config == ModelConfig(**{**vars(cfg), "name": "hf"})

    # The same through import_hf, with a model_config.yaml that composes as a conf/model/ file.
    path = import_hf(tmp_path / "hf", tmp_path / "imported2", name="imported")
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    shutil.copy(path / "model_config.yaml", conf / "model" / "imported.yaml")
    job = compose_job(["model=imported"], config_dir=conf)
    assert job.model == ModelConfig(**{**vars(cfg), "name": "imported"})

    # The trainer's entry point: every HybridLM.state_dict() key once, in order, tied head = embedding.
    loaded_cfg, tensors = load_hf_checkpoint(tmp_path / "hf")
    tensors = list(tensors)
    assert [n for n, _ in tensors] == list(native_shapes(cfg))
    state = dict(tensors)
    assert torch.equal(state["lm_head.weight"], state["embed.weight"])
    assert torch.equal(state["layers.0.mixer.in_proj.dt.weight"], a.tensor("layers.0.mixer.in_proj.dt.weight"))


def test_export_bf16_with_tokenizer_of_the_run(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<|begin_of_text|>", "<|end_of_text|>", "<pad>", "hello", "world", "[UNK]"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tok.save(str(tok_dir / "tokenizer.json"))
    # A run directory whose config names the tokenizer, as the trainer writes it.
    run = tmp_path / "run"
    ckpt = saved_model(run / "checkpoints" / "step_00000002", tiny_cfg())
    (run / "checkpoints" / "latest").write_text("step_00000002\n")
    (run / "config.yaml").write_text(f"data:\n  tokenizer: {tok_dir}\n")

    export_hf(run, tmp_path / "hf", dtype=torch.bfloat16)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["torch_dtype"]) == (0, 1, "bfloat16")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok("hello world", add_special_tokens=False)["input_ids"] == [3, 4]
    assert hf_tok.eos_token == "<|end_of_text|>"
    ours = NativeCheckpoint(ckpt).tensor("embed.weight")
    theirs = HFCheckpoint(tmp_path / "hf").tensor("embed.weight")
    assert theirs.dtype == torch.bfloat16 and torch.equal(theirs, ours.bfloat16())

    # An import keeps the tokenizer and the ids; exporting the import writes them again.
    imported = import_hf(tmp_path / "hf", tmp_path / "imported")
    assert (imported / "tokenizer" / "tokenizer.json").is_file()
    assert NativeCheckpoint(imported).dtype("embed.weight") == torch.bfloat16  # kept as stored
    assert torch.equal(load_model(imported).embed.weight, ours.bfloat16().float())  # loads into fp32
    export_hf(imported, tmp_path / "hf2")
    again = json.loads((tmp_path / "hf2" / "config.json").read_text())
    assert {k: again[k] for k in ("bos_token_id", "eos_token_id")} == {"bos_token_id": 0, "eos_token_id": 1}
    assert (tmp_path / "hf2" / "tokenizer.json").is_file()


def test_bamba_9b_config_json_is_conf_model_bamba_9b():
    """The released Bamba-9B config.json (transformers 4.x style: top-level rope_theta, explicit
    mamba_d_head, extra keys, no time_step_limit) maps to model=bamba_9b, so init_from=hf:DIR matches it."""
    from hybrid_train.model.hf import hf_bamba_config, model_config_from_hf

    released = {
        "architectures": ["BambaForCausalLM"], "model_type": "bamba", "attention_dropout": 0.0,
        "attn_layer_indices": [9, 18, 27], "attn_rotary_emb": 64, "bos_token_id": 128000, "eos_token_id": 128001,
        "pad_token_id": 0, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
        "intermediate_size": 14336, "mamba_chunk_size": 256, "mamba_conv_bias": True, "mamba_d_conv": 4,
        "mamba_d_head": 64, "mamba_d_state": 128, "mamba_dt_rank": 256, "mamba_expand": 2, "mamba_n_groups": 1,
        "mamba_n_heads": 128, "mamba_proj_bias": False, "max_position_embeddings": 262144,
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_logits_to_keep": 1,
        "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "use_cache": True, "use_mamba_kernels": True, "vocab_size": 128256,
    }
    bamba = compose_job(["model=bamba_9b"]).model
    assert model_config_from_hf(released, name="bamba_9b") == bamba
    # And back: what an export writes reads as the same config, transformers 5's infinity spelling included.
    written = hf_bamba_config(bamba)
    written["time_step_limit"] = [0.0, {"__float__": "Infinity"}]
    assert model_config_from_hf(written, name="bamba_9b") == bamba


@pytest.mark.parametrize("overrides, words", [
    (dict(partial_rotary_factor=0.25), "partial_rotary_factor=0.25"),
    (dict(head_dim=8), "head_dim=8 x n_heads=4 != d_model=64"),
    (dict(mlp_hidden=0), "mlp_hidden=0"),
])
def test_unsupported_configs_are_refused_by_name(tmp_path, overrides, words):
    ckpt = saved_model(tmp_path / "ckpt", tiny_cfg(**overrides))
    with pytest.raises(ValueError, match="cannot be expressed as a transformers Bamba model") as err:
        export_hf(ckpt, tmp_path / "hf")
    assert words in str(err.value)
    assert not (tmp_path / "hf").exists()


def test_import_refuses_tensors_that_do_not_match_the_config(tmp_path):
    ckpt = saved_model(tmp_path / "ckpt", tiny_cfg())
    export_hf(ckpt, tmp_path / "hf")
    config_path = tmp_path / "hf" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "mamba_d_state": 16}))
    with pytest.raises(ValueError, match=r"model.layers.0.mamba.in_proj.weight: stored \(296, 64\)"):
        HFCheckpoint(tmp_path / "hf")
    config_path.write_text(json.dumps({**config, "hidden_act": "gelu"}))
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        HFCheckpoint(tmp_path / "hf")


def test_trained_checkpoint_round_trips_through_the_scripts(tmp_path):
    """A checkpoint written by a real (2-step) training run -> export script -> transformers -> import script."""
    from hybrid_train.train.trainer import train

    run = tmp_path / "run"
    small = ["train.max_tokens=0", "train.seq_len=32", "train.micro_batch_size=2", "logging.progress=false",
             "model.n_layers=3", "model.attn_layer_indices=[1]"]
    train(compose_job(small + ["train.max_steps=2", f"run.dir={run}"]))
    load_script("export_hf").main(["--checkpoint", str(run), "--out", str(tmp_path / "hf"), "--no-progress"])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (256, 257)  # the run's byte tokenizer
    hf_logits_match(tmp_path / "hf", run, 258, length=70)
    load_script("import_hf").main(["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back"), "--tokens", "2e12",
                                   "--no-progress"])
    assert json.loads((tmp_path / "back" / "meta.json").read_text())["tokens"] == 2 * 10**12
    a, b = load_model(run).state_dict(), load_model(tmp_path / "back").state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # A new stage starts from the HF directory (one step at a negligible learning rate).
    train(compose_job(small + ["train.max_steps=1", f"run.dir={tmp_path / 'stage'}", "optim.lr=1e-12",
                               f"checkpoint.init_from=hf:{tmp_path / 'hf'}"]))
    for name, tensor in load_model(tmp_path / "stage").state_dict().items():
        torch.testing.assert_close(tensor, a[name], rtol=0, atol=1e-6, msg=name)


def test_eval_script_reports_loss_per_source(tmp_path):
    ckpt = saved_model(tmp_path / "ckpt", tiny_cfg(vocab_size=258))
    export_hf(ckpt, tmp_path / "hf")
    evaluate = load_script("eval")
    args = ["data=sample", f"data.root={REPO / 'data' / 'sample'}", "train.seq_len=48", "train.micro_batch_size=3",
            "--max-tokens", "500", "--no-progress"]
    native = evaluate.main(["--checkpoint", str(ckpt), *args, "--out", str(tmp_path / "eval.json")])
    assert json.loads((tmp_path / "eval.json").read_text()) == native
    assert sorted(native["sources"]) == ["code", "web"]
    for r in native["sources"].values():
        assert r["tokens"] == 4 * 48 * 3  # 500 tokens rounded up to whole batches
        assert abs(r["perplexity"] - torch.tensor(r["loss"]).exp().item()) < 1e-3 * r["perplexity"]
    assert native["all"]["tokens"] == 2 * 4 * 48 * 3
    # The HF export of the same weights scores the same.
    hf = evaluate.main(["--checkpoint", str(tmp_path / "hf"), *args])
    for name in native["sources"]:
        assert abs(hf["sources"][name]["loss"] - native["sources"][name]["loss"]) < 1e-5


def test_eval_scores_a_held_out_split_and_says_when_there_is_none(tmp_path):
    """scripts/eval.py read the training shards with the training seed, so its 'held-out' loss was
    measured on data the model trained on. A source's eval_paths are held out of training and scored."""
    import subprocess
    import sys

    from hybrid_train.data import build_data_loader, build_tokenizer

    ckpt = saved_model(tmp_path / "ckpt", tiny_cfg(vocab_size=258))
    held = "data.sources.web.eval_paths=[web/part-00003.jsonl.zst]"
    cmd = [sys.executable, "scripts/eval.py", "--checkpoint", str(ckpt), "data=sample", held, "train.seq_len=48",
           "--max-tokens", "200", "--no-progress", "--out", str(tmp_path / "eval.json")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["sources"]["web"]["held_out"] is True and result["sources"]["code"]["held_out"] is False
    assert result["all"]["held_out"] is False
    assert "source 'code' has no held-out split (data.sources.code.eval_paths is empty)" in proc.stderr
    assert "'web' has no held-out" not in proc.stderr
    # Training never reads the held-out shard, though paths' glob matches it.
    job = compose_job(["data=sample", held])
    loader = build_data_loader(job.data, build_tokenizer("byte"), 48, 2, 0, 1, 0)
    web = [Path(f).name for f in loader.spec.files["web"]]
    assert web == ["part-00000.jsonl.zst", "part-00001.jsonl.zst", "part-00002.jsonl.zst"]
    loader.close()
    with pytest.raises(ValueError, match="every shard of paths .* is held out"):
        build_data_loader(compose_job(["data=sample", "data.sources.web.eval_paths=[web/*.zst]"]).data,
                          build_tokenizer("byte"), 48, 2, 0, 1, 0)
