"""The batch script on a real single-node SLURM cluster (slurmctld + slurmd + munge on this machine):
the time-limit warning makes the trainer checkpoint and stop, the job requeues itself and resumes.

Needs Debian's slurm-wlm and munge and root (CI installs them); elsewhere the module is skipped.
"""

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (shutil.which("slurmctld") and shutil.which("munged") and os.geteuid() == 0),
                       reason="needs slurm-wlm and munge, as root"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=hybridtest", f"SlurmctldHost={host}", "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "JobRequeue=1", "MpiDefault=none",
        "ReturnToService=2", f"StateSaveLocation={root}/state", f"SlurmdSpoolDir={root}/spool",
        f"SlurmctldPidFile={root}/slurmctld.pid", f"SlurmdPidFile={root}/slurmd.pid",
        f"SlurmctldLogFile={root}/slurmctld.log", f"SlurmdLogFile={root}/slurmd.log",
        f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
        f"NodeName={host} CPUs={os.cpu_count()} State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    env = {**os.environ, "SLURM_CONF": str(conf)}
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    subprocess.run(["munged", "--force"], check=False, capture_output=True)
    daemons = [subprocess.Popen([d, "-D"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for d in ("slurmctld", "slurmd")]
    deadline = time.time() + 60
    while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout:
        assert time.time() < deadline, (root / "slurmctld.log").read_text()[-2000:]
        time.sleep(1)
    yield env, root
    subprocess.run(["scancel", "--full", "--user=root"], env=env, capture_output=True)
    for d in daemons:
        d.terminate()
        d.wait(timeout=30)


def _job_state(env, job: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=env, capture_output=True, text=True).stdout
    return out.strip()


def _wait(predicate, what: str, timeout: float = 300):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


def test_time_limit_warning_checkpoints_requeues_and_resumes(cluster):
    env, root = cluster
    run_dir, log = root / "run", root / "job.out"
    overrides = ["train.seq_len=32", "train.micro_batch_size=2", "train.max_tokens=0", "train.max_steps=60",
                 "logging.progress=false", "logging.log_every=1", "model.d_model=64", "model.mlp_hidden=128",
                 f"run.dir={run_dir}"]
    submit = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=60",
         f"--output={log}", "slurm/train.sbatch", *overrides],
        cwd=REPO, env={**env, "GPUS_PER_NODE": "1", "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    metrics = run_dir / "metrics.jsonl"
    _wait(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 10, "10 steps")
    # What SLURM does ten minutes before the time limit (--signal=B:USR1@600): signal the batch shell.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True)
    _wait(lambda: _job_state(env, job) == "PENDING", "the job to requeue itself")
    # SLURM holds a requeued job back for a while (BeginTime); shorten that, but not to zero: a start
    # before the old run's credential is cleaned up is refused ("Job credential revoked").
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+15"], env=env, check=True)
    final = run_dir / "checkpoints" / "step_00000060"
    _wait(lambda: final.is_dir() and _job_state(env, job) == "", "the requeued job to finish")
    text = log.read_text()
    assert "asking the trainer to checkpoint and stop" in text and "requeueing job" in text
    assert "resumed from" in text
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 61))  # every step once: nothing lost, nothing repeated
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_00000060" and not (run_dir / "STOP").exists()
