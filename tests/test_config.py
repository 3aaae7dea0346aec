"""Every shipped config composes and validates; bad input fails at start with a message naming it."""

from pathlib import Path

import shutil

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from conftest import compose_job
from hybrid_train.config import JobConfig, to_yaml
from hybrid_train.overrides import UnknownKeyError, check_keys
from hybrid_train.model import ModelConfig

CONF = Path(__file__).resolve().parents[1] / "conf"


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["model", "data", "optim", "schedule", "parallel", "logging"])
def test_every_shipped_option_composes_and_validates(compose, group):
    options = group_options(group)
    assert options, group
    for option in options:
        job = compose([f"{group}={option}"])
        assert to_yaml(job)  # serializable as written to <run.dir>/config.yaml


def test_defaults_and_run_dir(compose):
    job = compose([])
    assert job.model.name == "tiny" and job.model.layer_types.count("A") == 2
    assert job.run.dir == "outputs/tiny-sample"
    assert compose(["run.name=x"]).run.dir == "outputs/x"


def test_misspelt_key_on_command_line_fails(compose):
    with pytest.raises(UnknownKeyError, match="'model.d_modle'.*did you mean model.d_model\\?"):
        compose(["model.d_modle=3"])
    with pytest.raises(UnknownKeyError, match="'model.d_modle'.*did you mean model.d_model\\?"):
        compose(["+model.d_modle=3"])
    with pytest.raises(UnknownKeyError, match="did you mean data.sources.web.weight\\?"):
        compose(["+data.sources.web.wieght=3"])


@pytest.mark.parametrize("override, suggestion", [
    ("checkpoint.interval=5", "checkpoint.interval_steps"),
    ("+checkpoint.interval=5", "checkpoint.interval_steps"),
    ("seed=1", "train.seed"),
    ("++seed=1", "train.seed"),
    ("model.mamba.n_groups=2", "model.ssm_n_groups"),
    ("training.steps=10", "train.max_steps"),
    ("lr=1e-4", "optim.lr"),
])
def test_unknown_key_names_the_closest_real_key(compose, override, suggestion):
    """Keys as typed by users of other frameworks; the message never suggests `+key`, which is refused too."""
    with pytest.raises(UnknownKeyError) as info:
        compose([override])
    message = str(info.value)
    assert f"did you mean {suggestion}" in message and "+" not in message, message
    assert "hybrid_train/" in message and "config.py" in message  # where the fields are declared


def test_known_keys_and_names_pass_the_key_check():
    check_keys(["model=bamba_9b", "+stage=extend", "data.sources.web.weight=1", "+data.sources.new.paths=[a]",
                "~data.sources.web", "hydra.verbose=true", "optim.betas=[0.9,0.99]", "data.sources={}"], JobConfig)


def test_misspelt_key_in_a_yaml_file_fails(compose, tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "model" / "typo.yaml").write_text("defaults:\n  - tiny\n  - _self_\nd_modle: 64\n")
    with pytest.raises(Exception, match="d_modle") as info:
        compose(["model=typo"], config_dir=conf)
    assert "ModelConfig" in str(info.value) or "model" in str(info.value)


def test_wrong_type_fails(compose):
    with pytest.raises(ConfigCompositionException, match="model.n_layers=many") as info:
        compose(["model.n_layers=many"])
    assert isinstance(info.value.__cause__, ValidationError)
    assert "could not be converted to Integer" in str(info.value.__cause__)


@pytest.mark.parametrize("overrides, message", [
    (["model.n_kv_heads=3"], "n_heads=4 is not divisible by model.n_kv_heads=3"),
    (["model.ssm_head_dim=48"], "not divisible by model.ssm_head_dim=48"),
    (["model.ssm_n_groups=3"], "ssm_n_groups=3 does not divide"),
    (["model.attn_layer_indices=[2,6]"], "attn_layer_indices has 6"),
    (["model.layer_pattern=MMAMMM"], "layer_pattern='MMAMMM' puts attention at \\[2\\]"),
    (["model.layer_pattern=MMA"], "3 symbols but model.n_layers=6"),
    (["model.layer_pattern=MMXMMA", "model.attn_layer_indices=null"], "symbols \\['X'\\]"),
    (["schedule.name=exp"], "schedule.name='exp'"),
    (["train.max_steps=10", "train.max_tokens=100"], "set one of train.max_tokens \\(100\\) and train.max_steps \\(10\\)"),
    (["train.max_tokens=0"], "no run length"),
    (["stage.end_tokens=1000", "train.max_steps=5"], "stage.end_tokens=1000 sets the run length"),
    (["schedule.warmup_steps=5", "schedule.warmup_tokens=100"], "set one warmup length, not schedule.warmup_steps=5 and"),
    (["checkpoint.init_from=a", "checkpoint.resume_from=b"], "set one of them"),
    (["optim.lr=-1"], "optim.lr must be positive"),
    (["train.precision=fp8"], "train.precision='fp8'"),
    (["train.loss_impl=chunked"], "train.loss_impl='chunked' must be one of auto, fused, logits"),
    (["parallel.tp=2", "train.loss_impl=fused"], "train.loss_impl='fused' needs the whole LM head but parallel.tp=2"),
    (["logging.profile_from=-1"], "logging.profile_from must be >= 0 \\(0 = off\\)"),
    (["logging.profile_from=5", "logging.profile_steps=0"], "logging.profile_steps positive, got 5 and 0"),
    (["optim.moment_dtype=fp16"], "optim.moment_dtype='fp16' must be one of float32, bfloat16"),
    (["optim.moment_dtype=bfloat16", "optim.impl=fused"], "optim.moment_dtype=bfloat16 needs the Triton AdamW"),
])
def test_cross_field_validation_names_fields(compose, overrides, message):
    with pytest.raises(ValueError, match=message):
        compose(overrides)


def test_a_length_on_the_command_line_replaces_the_files():
    """conf/config.yaml sets train.max_tokens; a step count (or a stage window) given alone wins over it,
    as does a warmup in tokens over the schedule file's warmup_steps."""
    assert compose_job([]).train.max_tokens == 614400
    job = compose_job(["train.max_steps=6"])
    assert (job.train.max_steps, job.train.max_tokens) == (6, 0)
    job = compose_job(["train.max_tokens=0", "train.max_steps=6"])  # the old spelling still works
    assert (job.train.max_steps, job.train.max_tokens) == (6, 0)
    job = compose_job(["stage.end_tokens=1000"])
    assert (job.stage.end_tokens, job.train.max_tokens) == (1000, 0)
    job = compose_job(["schedule.warmup_tokens=4096"])
    assert (job.schedule.warmup_tokens, job.schedule.warmup_steps) == (4096, 0)
    assert compose_job(["schedule=wsd", "schedule.warmup_steps=3"]).schedule.warmup_steps == 3


def test_a_step_count_on_a_stage_replaces_its_window():
    """`+stage=extend train.max_steps=5` runs 5 steps of the stage (its data, schedule and start counter)."""
    job = compose_job(["+stage=extend", "checkpoint.init_from=hf:/m", "train.max_steps=5"])
    assert (job.train.max_steps, job.stage.end_tokens, job.stage.start_tokens) == (5, 0, 2_000_000_000_000)
    assert job.stage.name == "extend" and job.schedule.name == "constant"
    assert compose_job(["+stage=extend", "checkpoint.init_from=hf:/m"]).stage.end_tokens == 2_500_000_000_000


def test_a_job_built_in_code_with_two_lengths_is_refused():
    job = compose_job([])
    job.train.max_tokens, job.train.max_steps = 100, 10
    with pytest.raises(ValueError, match="set one of train.max_tokens"):
        job.validate()


def test_load_config_inside_a_hydra_app_leaves_its_state(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        outer = GlobalHydra.instance().hydra
        assert compose_job(["train.max_steps=2"]).train.max_steps == 2
        assert GlobalHydra.instance().hydra is outer
        assert compose(config_name="config", overrides=["model=bamba_9b"]).model.n_layers == 32
    assert not GlobalHydra.instance().is_initialized()
    with pytest.raises(FileNotFoundError, match="no config.yaml in"):
        compose_job([], config_dir=tmp_path)


def test_loss_impl_auto_is_fused_unless_tensor_parallel(compose):
    assert compose([]).fused_loss()
    assert not compose(["parallel.tp=2"]).fused_loss()
    assert not compose(["train.loss_impl=logits"]).fused_loss()
    assert not compose(["parallel=fsdp_tp", "train.loss_impl=logits"]).fused_loss()


def test_compile_defaults_to_on_for_cuda_only(compose):
    unset = compose([]).parallel
    assert unset.compile is None and unset.compile_on("cuda") and not unset.compile_on("cpu")
    assert not compose(["parallel.compile=false"]).parallel.compile_on("cuda")
    assert compose(["parallel.compile=true"]).parallel.compile_on("cpu")
    assert compose(["parallel=fsdp_tp"]).parallel.compile_on("cpu")  # the TP layout file sets it


def test_pattern_and_indices_agree(compose):
    job = compose(["model.layer_pattern=MMAMMA"])
    assert job.model.layer_types == list("MMAMMA")
    job = compose(["model=transformer_tiny"])
    assert set(job.model.layer_types) == {"A"}
    job = compose(["model=mamba2_tiny"])
    assert set(job.model.layer_types) == {"M"}


def test_model_config_validate_direct():
    with pytest.raises(ValueError, match="ssm_dt_limit"):
        ModelConfig(ssm_dt_limit=[1.0, 0.5]).validate()
