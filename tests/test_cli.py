"""train.py as a user types it: a step count alone, misspelt keys, and the header a run prints first."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hybrid_train.overrides import check_command_line
from hybrid_train.train.summary import run_header
from hybrid_train.train.trainer import plan_run

REPO = Path(__file__).resolve().parents[1]
TINY = ["train.seq_len=32", "train.micro_batch_size=2", "logging.progress=false"]


def train_py(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def test_a_step_count_alone_runs_and_the_header_says_what_the_run_does(tmp_path):
    """conf/config.yaml sets train.max_tokens; `train.max_steps=3` alone replaces it."""
    proc = train_py("train.max_steps=3", *TINY, f"run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 3 and records[-1]["tokens"] == 3 * 2 * 32
    header = proc.stdout.splitlines()[:8]
    assert header[0] == f"run tiny-sample: outputs in {tmp_path} (config.yaml, metrics.jsonl, checkpoints/)"
    text = "\n".join(header)
    for expected in ("model     tiny: 1.47M parameters", "MMAMMA (4 Mamba-2, 2 attention)",
                     "data      data/sample (byte tokenizer): web 70%, code 30%",
                     "length    3 steps x 64 tokens = 192 tokens (train.max_steps=3)",
                     "schedule  cosine: peak lr 0.003 after 1 warmup steps",  # 20 in the file, clamped to half the run
                     "devices   1 process(es) on cpu, fp32"):
        assert expected in text, (expected, text)


def test_misspelt_key_on_train_py_names_the_real_key():
    proc = train_py("checkpoint.interval=5")
    assert proc.returncode == 1
    assert "did you mean checkpoint.interval_steps" in proc.stderr and "+checkpoint" not in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_token_counts_written_as_floats_run_as_typed(tmp_path):
    """A user types token counts as 1e9 or 2.5e12; the int fields take them (OmegaConf alone refuses the float)."""
    proc = train_py("train.max_tokens=2.56e2", *TINY, f"run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "length    4 steps x 64 tokens = 256 tokens (train.max_tokens=256)" in proc.stdout
    proc = train_py("train.max_tokens=1.5e0", *TINY, f"run.dir={tmp_path}/b")
    assert proc.returncode == 1 and proc.stderr.strip() == "error: train.max_tokens=1.5e0 must be a whole number"
    plan = subprocess.run([sys.executable, "scripts/plan.py", "+stage=extend", "stage.start_tokens=2e12",
                           "stage.end_tokens=2.5e12", "cluster=a100_192"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert plan.returncode == 0 and "2,000B -> 2,500B tokens" in plan.stdout, plan.stderr[-2000:]


def test_load_config_takes_whole_numbers_written_as_floats():
    from hybrid_train.config import JobConfig, load_config
    from hybrid_train.overrides import whole_numbers

    job = load_config(["train.max_tokens=1e5", "checkpoint.interval_tokens=5e4", "data.sources.web.weight=2e0"])
    assert job.train.max_tokens == 100_000 and job.checkpoint.interval_tokens == 50_000
    assert job.data.sources["web"].weight == 2.0 and isinstance(job.data.sources["web"].weight, float)
    assert whole_numbers(["train.seq_len=64", "optim.lr=1e-3", "~train.seed", "model=tiny", "train.seed=1e0,2e0"],
                         JobConfig) == ["train.seq_len=64", "optim.lr=1e-3", "~train.seed", "model=tiny",
                                        "train.seed=1e0,2e0"]
    with pytest.raises(ValueError, match=r"train.seq_len=6.55e1 must be a whole number"):
        whole_numbers(["train.seq_len=6.55e1"], JobConfig)


def test_two_lengths_on_train_py_are_refused_in_one_line():
    proc = train_py("train.max_steps=3", "train.max_tokens=100")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == "error: set one of train.max_tokens (100) and train.max_steps (3)"


def test_bad_input_found_at_run_time_is_one_error_with_the_traceback_on_request(tmp_path):
    """A data path that matches nothing is found once the run starts: the error names the source, the
    pattern and where it looked, without a traceback unless HYDRA_FULL_ERROR=1 asks for it."""
    args = ("train.max_steps=2", *TINY, f"data.root={tmp_path / 'nowhere'}", f"run.dir={tmp_path / 'run'}")
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    first = proc.stderr.strip().splitlines()[-2]
    assert first.startswith("error: source ") and "matches no files" in first and "nowhere" in first, proc.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    full = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert full.returncode == 1 and "Traceback" in full.stderr and "resolve_paths" in full.stderr, full.stderr[-3000:]


@pytest.mark.parametrize("arg, suggestion", [
    ("+checkpoint.interval=5", "checkpoint.interval_steps"),
    ("seed=1", "train.seed"),
    ("model.mamba.n_groups=2", "model.ssm_n_groups"),
])
def test_train_py_key_check(arg, suggestion):
    """What train.py runs on its arguments before Hydra composes them (Hydra's flags pass through)."""
    with pytest.raises(SystemExit) as info:
        check_command_line(["--config-name", "config", "train.max_steps=3", arg], REPO / "conf")
    assert f"did you mean {suggestion}" in str(info.value) and "+" not in str(info.value).split(":", 1)[1]
    check_command_line(["--cfg", "job", "-m", "train.seed=1,2", "+stage=extend", "~data.sources.web"], REPO / "conf")


def test_a_config_group_of_ones_own_passes_the_key_check(tmp_path):
    """Hydra's `--config-dir` adds groups (here conf/experiment/); choosing one is not a misspelt key."""
    (tmp_path / "experiment").mkdir()
    check_command_line(["--config-dir", str(tmp_path), "+experiment=short"], REPO / "conf")
    check_command_line([f"--config-dir={tmp_path}", "+experiment=short"], REPO / "conf")
    with pytest.raises(SystemExit, match="'experiment'"):
        check_command_line(["+experiment=short"], REPO / "conf")


def test_header_of_a_stage_fits_one_screen(compose):
    job = compose(["+stage=extend", "checkpoint.init_from=hf:/models/Bamba-9B", "run.dir=/runs/extend"])
    plan = plan_run(job, 192, job.stage.end_tokens - job.stage.start_tokens)
    text = run_header(job, plan.total_steps, plan.tokens_per_step, plan.grad_accum, n_params=9_780_000_000,
                      n_embedding=525_336_576, world_size=192, device="cuda", precision="bf16",
                      start_total_tokens=job.stage.start_tokens, resumed_from="/runs/extend/checkpoints/step_00001000",
                      resumed_step=1000)
    lines = text.splitlines()
    assert len(lines) <= 10, text
    for expected in ("outputs in /runs/extend", "bamba_9b: 9.78B parameters (525M embedding), 32 blocks (29 Mamba-2, "
                     "attention at 9, 18, 27)", "dclm 90.5%, starcoder 4.5%",
                     "317,892 steps x 1,572,864 tokens = 500B tokens (stage.end_tokens=2.5T)",
                     "constant: peak lr 2e-05 after 100 warmup steps", "every 10B tokens",
                     "stage     extend: total tokens 2T -> 2.5T, weights from hf:/models/Bamba-9B",
                     "resumed from /runs/extend/checkpoints/step_00001000 at step 1000"):
        assert expected in text, (expected, text)


def test_hydra_compose_from_python_as_a_user_types_it():
    """Hydra's own compose API on conf/ right after `import hybrid_train` (the schemas register on import),
    then build and forward; a fresh process, so nothing registered them before."""
    code = f"""
import torch, hybrid_train
from hydra import compose, initialize_config_dir
with initialize_config_dir(config_dir={str(REPO / "conf")!r}, version_base=None):
    cfg = compose(config_name="config", overrides=["model=bamba_9b"])
assert hybrid_train.build_model(cfg.model, device="meta").cfg.n_layers == 32
with initialize_config_dir(config_dir={str(REPO / "conf")!r}, version_base=None):
    cfg = compose(config_name="config", overrides=["model.d_model=64"])
print(tuple(hybrid_train.build_model(cfg.model)(torch.tensor([[72, 105]])).shape))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "(1, 2, 258)"


def test_help_lists_the_config_groups_options_from_conf(tmp_path):
    """`train.py --help`: each group's YAML choices (a file a user adds shows up), not the schemas Hydra
    also holds; then the composed config."""
    from hybrid_train.config import config_group_options

    proc = train_py("--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    groups = proc.stdout.split("== Config ==")[0]
    assert "schema" not in groups
    assert "model: bamba_9b, granite4_h_small, " in groups and "cluster: a100_192, h100_64, h200_8" in groups
    assert "stage: anneal, extend, mix, mix_cosine, pretrain" in groups
    assert "train:\n  seed: 0" in proc.stdout
    (tmp_path / "model").mkdir()
    (tmp_path / "config.yaml").write_text("defaults: []\n")
    (tmp_path / "model" / "mine.yaml").write_text("name: mine\n")
    assert config_group_options(str(tmp_path)) == "model: mine"


def test_cfg_job_prints_the_job_as_the_run_uses_it():
    """`--cfg job`: the run length given on the command line wins over config.yaml's (Hydra's own print
    showed both), interpolations resolved; a bad combination is the run's own error."""
    proc = train_py("train.max_steps=3", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "  max_tokens: 0\n  max_steps: 3\n" in proc.stdout and "name: tiny-sample" in proc.stdout
    proc = train_py("train.max_steps=3", "train.max_tokens=5", "--cfg", "job")
    assert proc.returncode != 0 and "set one of train.max_tokens (5) and train.max_steps (3)" in proc.stderr
