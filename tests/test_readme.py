"""The README's commands, walked in order as a new user would, in a scratch copy of the checkout, with
tiny settings on CPU; the cluster-sized ones are composed and validated. A command the README gains must
be added here (RUN, COMPOSE or SKIP), so the README cannot drift from what the code does."""

import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from hybrid_train import load_config
from hybrid_train.train.trainer import train

README = REPO / "README.md"
TINY = {"train.seq_len": "32", "train.micro_batch_size": "2", "logging.progress": "false"}
TWO_STEPS = "train.max_steps=2"
# README paths that stand for what a user has (a model download, trained runs), and the run here
# that stands in for each; and values cut down for CPU.
STAND_INS = {"/models/Bamba-9B": "exports/tiny-hf", "outputs/anneal-a": "outputs/tiny-sample",
             "outputs/anneal-b": "outputs/constant-lr", "outputs/anneal-constant": "outputs/tiny-sample",
             "outputs/anneal-cosine": "outputs/constant-lr", "--max-tokens 200000": "--max-tokens 512",
             "train.max_tokens=2000000": "train.max_tokens=128",
             "train.global_batch_tokens=8192": "train.global_batch_tokens=256"}  # 2 micro-batches of 4 x 32

# Run in this order (each may use what an earlier one wrote), as shell lines or Python blocks.
RUN = [
    "python scripts/make_sample_data.py",
    "python train.py",
    "python: hybrid_train.load_model",
    "python: hybrid_train.load_config",
    "python train.py model=mamba2_tiny schedule=wsd train.max_tokens=2000000",
    "python train.py model.layer_pattern=MAMAMA model.attn_layer_indices=null run.name=alternating",
    "python train.py train.global_batch_tokens=8192 train.micro_batch_size=4 run.name=accum",
    "python train.py optim.lr=2e-5 schedule=constant train.z_loss=1e-4 run.name=constant-lr",
    "python train.py train.max_steps=6 logging.profile_from=3 logging.profile_steps=2 run.name=profiled",
    "python scripts/tokenize.py --tokenizer byte --out data/tok/web 'data/sample/web/*.jsonl.zst'",
    "python scripts/export_hf.py --checkpoint outputs/tiny-sample --out exports/tiny-hf [--dtype bf16] "
    "[--max-shard-size 5GB]",
    "python scripts/import_hf.py --hf /models/Bamba-9B --out checkpoints/bamba-9b-2T --tokens 2e12",
    "python: load_hf_checkpoint",
    "python scripts/merge.py --models outputs/anneal-a outputs/anneal-b --weights 0.5 0.5 --out merged/",
    "python scripts/merge.py --config merge.yaml --out merged/ --out-hf merged-hf/",
    "python scripts/eval.py --checkpoint outputs/tiny-sample data=sample train.seq_len=256 --max-tokens 200000 "
    "--out eval.json",
    "sbatch slurm/train.sbatch +stage=extend checkpoint.init_from=... run.dir=...",
    "slurm/stages.sh --init hf:DIR --runs DIR",
]
# Multi-GPU and real-data runs: their overrides must compose and validate.
COMPOSE = [
    "torchrun --nproc_per_node=8 train.py model=bamba_9b data=olmo_mix train.seq_len=4096 train.micro_batch_size=2",
    "torchrun --nproc_per_node=8 train.py +stage=extend checkpoint.init_from=hf:/models/Bamba-9B run.dir=/runs/extend",
    "torchrun --nproc_per_node=8 train.py +stage=mix checkpoint.init_from=/runs/extend run.dir=/runs/mix",
    "torchrun --nproc_per_node=8 train.py +stage=extend checkpoint.init_from=checkpoints/bamba-9b-2T "
    "data.tokenizer=checkpoints/bamba-9b-2T/tokenizer run.dir=/runs/extend",
    "torchrun --nproc_per_node=8 train.py parallel=hsdp",
    "torchrun --nproc_per_node=8 train.py parallel.tp=2 model.ssm_n_groups=2",
    "torchrun --nproc_per_node=8 train.py parallel.activation_checkpoint=selective",
    "torchrun --nproc_per_node=8 train.py model=jamba_52b parallel.ep=8",
    "python train.py model=jamba_mamba2_tiny",
    "python train.py model=granite4_tiny",
    "python train.py model=tiny model.moe_n_experts=8 model.moe_every=2 model.moe_offset=1",
]
WALK = "tests/test_stages.py runs the stage walk-through block as written"
PLAN = "tests/test_plan.py runs the planner's CLI with these overrides"
SKIP = {
    "pip install torch==2.13.0": "installs (CI does it)",
    "pip install -e .": "installs",
    'pip install -e ".[dev]"': "installs",
    "python -m pytest -q": "the test suite itself",
    "python train.py train.max_steps=20": "tests/test_cli.py runs train.py with a step count alone",
    "python train.py train.max_steps=6": "tests/test_cli.py runs train.py with a step count alone",
    "python train.py train.max_steps=6 --cfg job": "tests/test_cli.py runs train.py --cfg job",
    "python train.py --help": "tests/test_cli.py runs train.py --help",
    "huggingface-cli download ibm-fms/Bamba-9B --local-dir /models/Bamba-9B": "network; exports/tiny-hf stands in",
    "pip install lm-eval": "installs",
    "lm_eval --model hf --model_args pretrained=exports/bamba-v2,dtype=bfloat16 --tasks hellaswag,arc_easy,"
    "arc_challenge,piqa,winogrande,mmlu --batch_size 8 --device cuda": "a GPU and downloaded benchmark data",
    "python scripts/bench_data.py": "a benchmark (minutes); its parts are tested in tests/test_data*.py",
    "python scripts/bench.py --ladder": "a GPU benchmark; tests/test_bench.py runs its CPU smoke settings",
    "python scripts/bench_train.py [train.py overrides]": "a benchmark; tests/test_bench.py runs it on CPU",
    "python scripts/bench_optimizer.py model=...": "a GPU benchmark; tests/test_bench.py runs it on CPU",
    "python train.py checkpoint.init_from=RUN train.max_tokens=...": "a placeholder; tests/test_stages.py runs it",
    'TINY="model=tiny data=sample train.seq_len=32 train.micro_batch_size=2"': WALK,
    "python train.py +stage=pretrain $TINY stage.tokens=1280 run.dir=outputs/walk/pretrain": WALK,
    "python train.py +stage=extend $TINY stage.tokens=640 checkpoint.init_from=outputs/walk/pretrain "
    "run.dir=outputs/walk/extend": WALK,
    "python train.py +stage=mix $TINY stage.tokens=640 checkpoint.init_from=outputs/walk/extend "
    "run.dir=outputs/walk/mix": WALK,
    "python train.py +stage=mix_cosine $TINY stage.tokens=640 checkpoint.init_from=outputs/walk/extend "
    "run.dir=outputs/walk/mix_cosine": WALK,
    "python train.py +stage=anneal $TINY stage.tokens=320 checkpoint.init_from=outputs/walk/mix "
    "run.dir=outputs/walk/anneal_mix": WALK,
    "python train.py +stage=anneal $TINY stage.tokens=320 checkpoint.init_from=outputs/walk/mix_cosine "
    "run.dir=outputs/walk/anneal_mix_cosine": WALK,
    "python scripts/merge.py --models outputs/walk/anneal_mix outputs/walk/anneal_mix_cosine --weights 0.5 0.5 "
    "--out outputs/walk/merged": WALK,
    "python scripts/plan.py model=bamba_9b cluster=a100_192 train.seq_len=4096 train.micro_batch_size=2": PLAN,
    "python scripts/plan.py +stage=extend cluster=h100_64 parallel=hsdp parallel.activation_checkpoint=full "
    "plan.out=plan.json": PLAN,
    "python scripts/plan.py model=bamba_9b cluster=h200_8 train.seq_len=4096 train.micro_batch_size=2 "
    "plan.memory_table=true": PLAN,
}


def readme_commands() -> list[str]:
    """Every command line of the README's bash blocks (`&&` chains split, comments dropped, `\\` joined)
    and of its inline `python ...`, `torchrun ...`, `sbatch ...`, `slurm/....sh ...` spans; Python blocks
    are named by their first hybrid_train call."""
    text = README.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*", "", line).strip()
            commands += [" ".join(part.split()) for part in line.split("&&") if part.strip()]
    for span in re.findall(r"`((?:python|torchrun|sbatch) [^`\n]+|slurm/\w+\.sh [^`\n]+)`", text):
        commands.append(span)
    for block in python_blocks():
        commands.append("python: " + re.search(r"(hybrid_train\.\w+|load_hf_checkpoint)\(", block).group(1))
    return list(dict.fromkeys(commands))


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_every_readme_command_is_walked_or_skipped_for_a_reason():
    known = set(RUN) | set(COMPOSE) | set(SKIP)
    unknown = [c for c in readme_commands() if c not in known]
    assert not unknown, f"README commands this test does not know (add them to RUN, COMPOSE or SKIP): {unknown}"
    stale = [c for c in known if c not in readme_commands()]
    assert not stale, f"commands listed here that the README no longer has: {stale}"


@pytest.mark.parametrize("command", COMPOSE)
def test_cluster_commands_compose_and_validate(command):
    overrides = [a for a in shlex.split(command) if "=" in a and not a.startswith("-")]
    job = load_config(overrides)
    assert job.train.seq_len > 0


def scratch_checkout(root: Path) -> Path:
    """The code of the checkout (links) and nothing it wrote: no data/sample, outputs/, exports/."""
    for name in ("train.py", "conf", "scripts", "slurm"):
        (root / name).symlink_to(REPO / name)
    (root / "data").mkdir()
    return root


def stand_in(command: str) -> str:
    for readme, here in STAND_INS.items():
        command = command.replace(readme, here)
    return re.sub(r" \[[^\]]*\]", "", command)  # optional arguments shown in brackets


def with_tiny_settings(args: list[str]) -> list[str]:
    """A train.py command cut to two tiny steps: the command's own settings stay."""
    given = {a.split("=", 1)[0] for a in args}
    extra = [f"{k}={v}" for k, v in TINY.items() if k not in given]
    if not given & {"train.max_tokens", "train.max_steps"}:
        extra.append(TWO_STEPS)
    return args + extra


def run_line(command: str, cwd: Path, monkeypatch) -> None:
    argv = shlex.split(stand_in(command))
    if argv[:2] == ["python", "train.py"] and len(argv) == 2:  # the quickstart: as a process, as typed
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, *argv[1:], *with_tiny_settings([])], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.startswith("run tiny-sample: outputs in outputs/tiny-sample"), proc.stdout[:500]
    elif argv[:2] == ["python", "train.py"]:  # the rest in this process, composed as train.py composes
        job = load_config(with_tiny_settings(argv[2:]))
        result = train(job)
        steps = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv[2:] if "=" in a}.get("train.max_steps", 2)
        assert result.state.step == int(steps) and not result.stopped
        if job.logging.profile_from:
            assert (Path(job.run.dir) / "profile" / "summary.txt").exists()
    elif argv[0] == "python":  # a script, run as __main__ with its arguments
        if argv[1] == "scripts/merge.py":  # the two merge examples are alternatives
            for out in ("merged", "merged-hf"):
                shutil.rmtree(cwd / out, ignore_errors=True)
        monkeypatch.setattr(sys, "argv", argv[1:])
        try:
            runpy.run_path(str(cwd / argv[1]), run_name="__main__")
        except SystemExit as exit_:
            assert exit_.code in (0, None), command
    else:  # sbatch / slurm/*.sh: a dry run of the batch script
        script = argv[1:] if argv[0] == "sbatch" else argv
        proc = subprocess.run(["bash", *script], cwd=cwd, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "DRY_RUN": "1"})
        assert proc.returncode == 0, proc.stderr


def run_python_block(name: str) -> None:
    block = next(b for b in python_blocks() if f"{name.removeprefix('python: ')}(" in b)
    exec(compile(stand_in(block), f"README.md ({name})", "exec"), {})


def test_readme_commands_run_in_order(tmp_path, monkeypatch):
    cwd = scratch_checkout(tmp_path)
    monkeypatch.chdir(cwd)
    merge_yaml = re.search(r"```yaml\n(# merge\.yaml.*?)```", README.read_text(), re.S).group(1)
    (cwd / "merge.yaml").write_text(stand_in(merge_yaml))
    for command in RUN:
        start = time.perf_counter()
        if command.startswith("python: "):
            run_python_block(command)
        else:
            run_line(command, cwd, monkeypatch)
        print(f"{time.perf_counter() - start:6.1f}s  {command}")  # shown with -s or on a failure
    assert sorted(p.name for p in (cwd / "outputs").iterdir()) == [
        "accum", "alternating", "constant-lr", "mamba2_tiny-sample", "profiled", "tiny-sample"]
    assert (cwd / "merged-hf" / "config.json").is_file() and (cwd / "eval.json").is_file()
    assert (cwd / "checkpoints" / "bamba-9b-2T").is_dir() and (cwd / "data" / "tok" / "web" / "manifest.json").is_file()
