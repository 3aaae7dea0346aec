"""Model merging: linear (MergeKit's weighted average) and slerp, checked tensor by tensor against
independent computations; YAML configs, mixed native/HF inputs, refusals, streaming."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import LiveTensors
from hybrid_train import load_model
from hybrid_train.model import ModelConfig, build_model
from hybrid_train.model.hf import HFCheckpoint
from hybrid_train.train.checkpoint import write_model_checkpoint
from hybrid_train.train.export import NativeCheckpoint, export_hf
from hybrid_train.train.merge import MergedSource, MergeSpec, load_merge_config, merge, slerp

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
REPO = Path(__file__).resolve().parents[1]


def cfg(**overrides) -> ModelConfig:
    base = dict(name="m", vocab_size=61, d_model=64, n_layers=2, attn_layer_indices=[1], mlp_hidden=64,
                n_heads=4, n_kv_heads=2, head_dim=16, ssm_d_state=8, ssm_head_dim=16, ssm_n_groups=2,
                ssm_chunk_size=8)
    base.update(overrides)
    return ModelConfig(**base)


def saved(path: Path, config: ModelConfig, seed: int, transform=None) -> Path:
    torch.manual_seed(seed)
    state = build_model(config).state_dict()
    if transform is not None:
        state = {k: transform(v) for k, v in state.items()}
    return write_model_checkpoint(path, state, config)


def states(*paths) -> list[dict]:
    return [{k: v.double() for k, v in load_model(p).state_dict().items()} for p in paths]


def test_linear_merge_is_the_weighted_average_of_every_tensor(tmp_path):
    paths = [saved(tmp_path / f"m{i}", cfg(), seed=i) for i in range(3)]
    weights = [0.2, 0.3, 1.5]
    out = merge(MergeSpec(models=[str(p) for p in paths], weights=weights), out=tmp_path / "merged")["checkpoint"]
    thetas = states(*paths)
    merged = NativeCheckpoint(out)
    assert sorted(merged.names()) == sorted(thetas[0])
    for name in merged.names():
        expected = sum(w * t[name] for w, t in zip(weights, thetas)) / sum(weights)
        torch.testing.assert_close(merged.tensor(name).double(), expected, rtol=1e-6, atol=1e-7, msg=name)
    assert NativeCheckpoint(out).meta["merge"]["weights"] == weights
    # normalize: false is the plain weighted sum.
    out = merge(MergeSpec(models=[str(p) for p in paths[:2]], weights=[0.5, 2.0], normalize=False),
                out=tmp_path / "summed")["checkpoint"]
    summed = NativeCheckpoint(out)
    for name in summed.names():
        torch.testing.assert_close(summed.tensor(name).double(), 0.5 * thetas[0][name] + 2.0 * thetas[1][name],
                                   rtol=1e-6, atol=1e-7, msg=name)


def test_yaml_config_with_a_hf_input_and_hf_output(tmp_path):
    a = saved(tmp_path / "a", cfg(tie_embeddings=True), seed=1)
    b = saved(tmp_path / "b", cfg(tie_embeddings=True), seed=2)
    export_hf(b, tmp_path / "b_hf", tokenizer=None)
    (tmp_path / "merge.yaml").write_text(
        "models:\n"
        "  - model: a\n    parameters:\n      weight: 3\n"
        "  - model: b_hf\n    parameters:\n      weight: 1\n"
        "merge_method: linear\nparameters:\n  normalize: true\ndtype: bfloat16\n")
    spec = load_merge_config(tmp_path / "merge.yaml")
    assert spec.weights == [3.0, 1.0] and spec.dtype == torch.bfloat16 and spec.models[1] == str(tmp_path / "b_hf")
    spec_module = importlib.util.spec_from_file_location("merge_script", REPO / "scripts" / "merge.py")
    script = importlib.util.module_from_spec(spec_module)
    spec_module.loader.exec_module(script)
    script.main(["--config", str(tmp_path / "merge.yaml"), "--out-hf", str(tmp_path / "out_hf"),
                 "--max-shard-size", "20000", "--no-progress"])
    ta, tb = states(a, b)
    out = HFCheckpoint(tmp_path / "out_hf")
    assert out.model_config.tie_embeddings
    for name in out.names():
        got = out.tensor(name)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), (3 * ta[name] + tb[name]) / 4, rtol=8e-3, atol=1e-6, msg=name)


def numpy_slerp(t, v0, v1, threshold=0.9995, eps=1e-8):
    """MergeKit's slerp, restated in numpy."""
    a, b = v0.numpy().astype(np.float64), v1.numpy().astype(np.float64)
    na = a / np.linalg.norm(a) if np.linalg.norm(a) > eps else a
    nb = b / np.linalg.norm(b) if np.linalg.norm(b) > eps else b
    dot = np.sum(na * nb)
    if abs(dot) > threshold:
        return torch.from_numpy((1 - t) * a + t * b)
    theta = np.arccos(dot)
    return torch.from_numpy(np.sin((1 - t) * theta) / np.sin(theta) * a + np.sin(t * theta) / np.sin(theta) * b)


def test_slerp_two_models(tmp_path):
    a = saved(tmp_path / "a", cfg(), seed=3)
    b = saved(tmp_path / "b", cfg(), seed=4)
    out = merge(MergeSpec(models=[str(a), str(b)], weights=[], method="slerp", t=0.3), out=tmp_path / "s")
    ta, tb = states(a, b)
    merged = NativeCheckpoint(out["checkpoint"])
    for name in merged.names():
        expected = numpy_slerp(0.3, ta[name], tb[name])
        torch.testing.assert_close(merged.tensor(name).double(), expected, rtol=1e-5, atol=1e-6, msg=name)
    # Nearly colinear tensors (here b = 2a, and all-ones norms) fall back to linear interpolation.
    x = torch.randn(50)
    torch.testing.assert_close(slerp(0.25, x, 2 * x), 0.75 * x + 0.5 * x)
    assert torch.equal(slerp(0.0, x, -x), x)
    torch.testing.assert_close(slerp(1.0, x, torch.ones(50)), torch.ones(50))
    # Orthogonal unit vectors: halfway is at 45 degrees, still of unit norm.
    mid = slerp(0.5, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(mid, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))


def test_refuses_different_architectures_and_shapes(tmp_path):
    a = saved(tmp_path / "a", cfg(), seed=0)
    b = saved(tmp_path / "b", cfg(d_model=32, n_heads=2), seed=0)
    with pytest.raises(ValueError, match="different architectures") as err:
        MergedSource(MergeSpec(models=[str(a), str(b)], weights=[1, 1]))
    assert "d_model: 64 -> 32" in str(err.value)
    # Same config, but one tensor stored with another shape: the error names it.
    torch.manual_seed(0)
    state = build_model(cfg()).state_dict()
    state["layers.0.mixer.D"] = torch.ones(5)
    c = write_model_checkpoint(tmp_path / "c", state, cfg())
    with pytest.raises(ValueError, match=r"tensor layers.0.mixer.D has shape \(8,\) vs \(5,\)"):
        MergedSource(MergeSpec(models=[str(a), str(c)], weights=[1, 1]))
    with pytest.raises(ValueError, match="slerp merges exactly two models"):
        MergeSpec(models=["x", "y", "z"], weights=[], method="slerp").validate()
    (tmp_path / "bad.yaml").write_text("models:\n  - model: a\n  - model: b\nmerge_method: linear\n")
    with pytest.raises(ValueError, match=r"models\[0\] \(a\) has no parameters.weight"):
        load_merge_config(tmp_path / "bad.yaml")


def test_merge_streams_a_few_tensors_at_a_time(tmp_path):
    paths = [saved(tmp_path / f"m{i}", cfg(n_layers=4, attn_layer_indices=[1, 3]), seed=i) for i in range(3)]
    merged = MergedSource(MergeSpec(models=[str(p) for p in paths], weights=[1, 1, 1]))
    tracker = LiveTensors(*merged.sources)
    from hybrid_train.train.export import write_native_checkpoint

    write_native_checkpoint(tmp_path / "out", merged)
    assert 3 <= tracker.peak <= 4, tracker.peak  # the three inputs of the tensor being merged
