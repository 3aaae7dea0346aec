"""Moving weights between native checkpoints and Hugging Face Bamba directories, one tensor at a time.

A *tensor source* is anything with `model_config`, `names()`, `shape(name)`, `dtype(name)` and
`tensor(name)` in this model's names: a native checkpoint (`NativeCheckpoint`), a HF directory
(`hybrid_train.model.hf.HFCheckpoint`) or a merge of several (`hybrid_train.train.merge`). Writers
pull tensors from a source only when they write them:

- `export_hf`: safetensors shards of at most `max_shard_size` bytes (a tensor larger than that gets a
  shard of its own); only the shard being filled is held in memory, counted in `ShardWriter.peak_bytes`.
- `write_native_checkpoint`: a weights-only DCP checkpoint, one file per tensor, each tensor produced
  by the source while DCP writes it (a save planner that resolves tensors lazily).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from hybrid_train.model import HybridLM, ModelConfig, build_model
from hybrid_train.model.hf import SAFE_INDEX, HFCheckpoint, hf_config, hf_empty_tensors, hf_layout, is_hf_dir
from hybrid_train.train.checkpoint import (META, model_config_from_meta, model_tensor_metadata,
                                           read_meta, resolve_checkpoint, weights_only_meta)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float64: "float64"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
TOKENIZER_DIR = "tokenizer"  # where an import keeps the HF directory's tokenizer, inside the checkpoint
DEFAULT_MAX_SHARD = 5 * 10**9


def parse_dtype(name: str | None) -> torch.dtype | None:
    """'bf16' / 'bfloat16' / 'fp16' / 'fp32' / ... -> torch dtype; None or 'auto' keeps the stored dtype."""
    if name is None or name == "auto":
        return None
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} must be one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2KiB' or a plain byte count -> bytes."""
    if isinstance(text, int):
        return text
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * factor)
    return int(upper)


# ---- sources ------------------------------------------------------------------------------------

class NativeCheckpoint:
    """A native checkpoint (any parallel layout) as a tensor source: full tensors read one at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = resolve_checkpoint(path)
        self.meta = read_meta(self.path)
        self.model_config = model_config_from_meta(self.meta, self.path)
        self._stored = model_tensor_metadata(self.path)

    def names(self) -> list[str]:
        return list(self._stored)

    def shape(self, name: str) -> torch.Size:
        return self._stored[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._stored[name][1]

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self._stored:
            raise KeyError(f"{self.path} has no model tensor {name!r}")
        shape, dtype = self._stored[name]
        state = {"model": {name: torch.empty(shape, dtype=dtype)}}
        dcp.load(state, checkpoint_id=str(self.path))
        return state["model"][name]


def open_source(path: str | os.PathLike):
    """A HF Bamba directory (config.json + safetensors) or a native checkpoint / run directory."""
    path = Path(path)
    hf_like = (path / "config.json").is_file() and not (path / META).is_file()
    return HFCheckpoint(path) if is_hf_dir(path) or hf_like else NativeCheckpoint(path)


def load_source_model(path: str | os.PathLike, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> HybridLM:
    """The model of a native checkpoint or of a HF Bamba directory, in eval mode."""
    source = open_source(path)
    model = build_model(source.model_config, device="meta")
    model.to_empty(device=device)
    model.tie_weights()
    with torch.no_grad():
        for name, target in model.state_dict().items():
            target.copy_(source.tensor(name))
    return model.to(dtype).eval()


# ---- HF export ----------------------------------------------------------------------------------

class ShardWriter:
    """Collects tensors into safetensors shards of at most `max_bytes` and writes each when full.

    `held_bytes` is what the writer holds right now (the shard being filled), `peak_bytes` its maximum:
    the export's memory bound, checkable by tests.
    """

    def __init__(self, out_dir: Path, plan: list[list[str]]):
        self.out_dir, self.plan = out_dir, plan
        self.files = [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
        self.weight_map = {name: self.files[i] for i, names in enumerate(plan) for name in names}
        self._pending: dict[str, torch.Tensor] = {}
        self._shard = 0
        self.held_bytes = self.peak_bytes = self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self.weight_map.get(name) != self.files[self._shard]:
            raise RuntimeError(f"tensor {name} arrived out of the planned order")
        self._pending[name] = tensor.contiguous()
        self.held_bytes += tensor.nbytes
        self.peak_bytes = max(self.peak_bytes, self.held_bytes)
        if len(self._pending) == len(self.plan[self._shard]):
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self._pending, str(self.out_dir / self.files[self._shard]), metadata={"format": "pt"})
        self.total_bytes += self.held_bytes
        self._pending, self.held_bytes = {}, 0
        self._shard += 1

    def write_index(self) -> None:
        if self._shard != len(self.plan):
            raise RuntimeError(f"only {self._shard} of {len(self.plan)} shards were written")
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Consecutive groups of names whose sizes add up to at most max_bytes (a larger tensor alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes:
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


@dataclasses.dataclass
class ExportResult:
    out_dir: Path
    shards: int
    total_bytes: int
    peak_bytes: int
    """Most tensor bytes the shard writer held at once."""
    tokenizer: str | None
    """The tokenizer whose files were written (None: none)."""


def export_hf(source, out_dir: str | os.PathLike, dtype: torch.dtype | None = None,
              max_shard_size: int = DEFAULT_MAX_SHARD, tokenizer: str | None = "auto",
              token_ids: dict | None = None, progress: bool = False) -> ExportResult:
    """Write `source` (a tensor source, or a path for `open_source`) as a HF Bamba directory (a
    GraniteMoeHybrid one for an MoE model).

    config.json (every BambaConfig / GraniteMoeHybridConfig field), safetensors shards +
    model.safetensors.index.json, generation_config.json, and the tokenizer files. `tokenizer`: "auto"
    (the source's, see `source_tokenizer`), "byte", a tokenizer.json or a folder, or None. `token_ids` (bos/eos/pad)
    override the tokenizer's. Refuses to overwrite a non-empty `out_dir`.
    """
    if isinstance(source, (str, os.PathLike)):
        source = open_source(source)
    cfg = source.model_config
    tokenizer, ids = resolve_tokenizer(source, tokenizer, token_ids)
    hf_cfg = hf_config(cfg, **ids)  # raises first for what transformers cannot express
    empty = hf_empty_tensors(cfg)  # zero-size HF tensors with no native counterpart
    layout = hf_layout(cfg) + [(name, []) for name in empty]
    out_dtype = {hf: dtype or source.dtype(parts[0] if parts else "embed.weight") for hf, parts in layout}
    sizes = [(hf, sum(source.shape(p).numel() for p in parts) * out_dtype[hf].itemsize) for hf, parts in layout]
    hf_cfg["torch_dtype"] = DTYPE_NAMES[dtype or source.dtype("embed.weight")]

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; refusing to overwrite it")
    with _staging(out_dir) as tmp:
        writer = ShardWriter(tmp, plan_shards(sizes, max_shard_size))
        bar = _progress(progress, len(layout), "export")
        for hf_name, parts in layout:
            pieces = [source.tensor(p) for p in parts] or [torch.zeros(empty[hf_name])]
            tensor = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
            del pieces
            writer.add(hf_name, tensor.to(out_dtype[hf_name]))
            del tensor
            bar.update()
        bar.close()
        writer.write_index()
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        generation = {"_from_model_config": True, **{k: v for k, v in ids.items() if v is not None}}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if tokenizer not in (None, "byte"):
            copy_tokenizer(tokenizer, tmp)
            if not (tmp / "tokenizer_config.json").exists():
                (tmp / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(tmp, ids), indent=2) + "\n")
    return ExportResult(out_dir, len(writer.plan), writer.total_bytes, writer.peak_bytes,
                        None if tokenizer in (None, "byte") else str(tokenizer))


# ---- tokenizers ---------------------------------------------------------------------------------

def source_tokenizer(source) -> tuple[str | None, dict]:
    """(tokenizer spec, recorded bos/eos/pad ids) of a tensor source: a HF directory's own tokenizer
    and config ids; a native checkpoint's `tokenizer/` folder (left by an import or a merge), its
    meta.json's `tokenizer`, else `data.tokenizer` of the run's config.yaml; a merge's first model's."""
    if hasattr(source, "sources"):  # a merge
        return source_tokenizer(source.sources[0])
    if isinstance(source, HFCheckpoint):
        return (str(source.dir) if (source.dir / "tokenizer.json").is_file() else None), dict(source.token_ids)
    if isinstance(source, NativeCheckpoint):
        ids = dict(source.meta.get("hf_token_ids") or {})
        if (source.path / TOKENIZER_DIR).is_dir():
            return str(source.path / TOKENIZER_DIR), ids
        if source.meta.get("tokenizer"):
            return source.meta["tokenizer"], ids
        for config in (source.path.parent.parent / "config.yaml", source.path.parent / "config.yaml"):
            if config.is_file():
                from omegaconf import OmegaConf

                return str(OmegaConf.select(OmegaConf.load(config), "data.tokenizer", default="byte")), ids
        return None, ids
    return None, {}


def resolve_tokenizer(source, tokenizer: str | None, token_ids: dict | None) -> tuple[str | None, dict]:
    """(tokenizer spec to write, bos/eos/pad ids): the tokenizer's ids, then the source's recorded ids
    (when `tokenizer` is "auto"), then `token_ids`, each overriding the previous where not None."""
    recorded: dict = {}
    if tokenizer == "auto":
        tokenizer, recorded = source_tokenizer(source)
    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if tokenizer is not None:
        from hybrid_train.data.tokenizer import build_tokenizer

        try:
            tok = build_tokenizer(str(tokenizer))
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{err}; pass the tokenizer explicitly (or none)") from None
        ids.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=_pad_id(tokenizer))
    for extra in (recorded, token_ids or {}):
        ids.update({k: v for k, v in extra.items() if k in ids and v is not None})
    return tokenizer, ids


def _pad_id(spec: str) -> int | None:
    """The id of tokenizer_config.json's pad_token, when the folder has one."""
    folder = Path(spec)
    if spec == "byte" or not (folder.is_dir() and (folder / "tokenizer_config.json").is_file()):
        return None
    from tokenizers import Tokenizer

    pad = json.loads((folder / "tokenizer_config.json").read_text()).get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    return Tokenizer.from_file(str(folder / "tokenizer.json")).token_to_id(pad) if pad else None


def copy_tokenizer(spec: str | os.PathLike, dest: Path) -> None:
    """Copy a tokenizer folder's tokenizer files (or a bare tokenizer.json, as tokenizer.json) to dest."""
    path = Path(spec)
    dest.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        for name in TOKENIZER_FILES:
            if (path / name).is_file():
                shutil.copy2(path / name, dest / name)
    else:
        shutil.copy2(path, dest / "tokenizer.json")


def _tokenizer_config(folder: Path, ids: dict) -> dict:
    """A minimal tokenizer_config.json for a bare tokenizer.json, so AutoTokenizer can load it."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for key in ("bos", "eos", "pad"):
        if ids.get(f"{key}_token_id") is not None:
            config[f"{key}_token"] = tok.id_to_token(ids[f"{key}_token_id"])
    return config


# ---- native checkpoints -------------------------------------------------------------------------

class _LazySavePlanner(DefaultSavePlanner):
    """Plans from placeholder (meta) tensors and asks `produce(name)` for each model tensor only when
    the storage writer writes it."""

    def __init__(self, produce: Callable[[str], torch.Tensor]):
        super().__init__()
        self.produce = produce

    def resolve_data(self, write_item):
        fqn = write_item.index.fqn
        if not fqn.startswith("model."):
            return super().resolve_data(write_item)
        planned = write_item.tensor_data
        tensor = self.produce(fqn[len("model."):]).to(planned.properties.dtype)
        if tensor.shape != planned.size:
            raise ValueError(f"tensor {fqn[len('model.'):]} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(planned.size)}")
        return tensor.contiguous()


def write_native_checkpoint(path: str | os.PathLike, source, meta: dict | None = None,
                            dtype: torch.dtype | None = None, tokenizer: str | None = "auto",
                            progress: bool = False) -> Path:
    """A weights-only native checkpoint from a tensor source (same layout and meta.json as
    `checkpoint.write_model_checkpoint`), holding about one tensor at a time. The tokenizer ("auto":
    the source's) is kept in a `tokenizer/` folder, its bos/eos/pad ids in meta.json."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; refusing to overwrite it")
    tokenizer, ids = resolve_tokenizer(source, tokenizer, None)
    names = source.names()
    placeholders = {n: torch.empty(source.shape(n), dtype=dtype or source.dtype(n), device="meta") for n in names}
    bar = _progress(progress, len(names), "write")

    def produce(name: str) -> torch.Tensor:
        bar.update()
        return source.tensor(name)

    extra = {"hf_token_ids": {k: v for k, v in ids.items() if v is not None}}
    if tokenizer == "byte":
        extra["tokenizer"] = "byte"
    full_meta = weights_only_meta(source.model_config, {**extra, **(meta or {})})
    with _staging(path) as tmp:
        writer = dcp.FileSystemWriter(str(tmp), single_file_per_rank=False)  # one file per tensor
        dcp.save({"model": placeholders}, storage_writer=writer, planner=_LazySavePlanner(produce))
        bar.close()
        if tokenizer not in (None, "byte"):
            copy_tokenizer(tokenizer, tmp / TOKENIZER_DIR)
        (tmp / META).write_text(json.dumps(full_meta, indent=2))
    return path


def model_config_yaml(cfg: ModelConfig, comment: str = "") -> str:
    """`cfg` as a conf/model/ file (every field written out)."""
    from omegaconf import OmegaConf

    head = "".join(f"# {line}\n" for line in comment.splitlines())
    body = OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(cfg)))
    return f"{head}defaults:\n  - model_schema\n{body}"


def import_hf(hf_dir: str | os.PathLike, out: str | os.PathLike, dtype: torch.dtype | None = None,
              name: str | None = None, tokens: int = 0, progress: bool = False) -> Path:
    """A HF Bamba directory as a native weights-only checkpoint, with `model_config.yaml` (usable as a
    conf/model/ file) and the directory's tokenizer files under `tokenizer/`. `tokens`: how many
    tokens the model was trained on (meta.json's counter, which a next stage's start_tokens is checked
    against; Bamba-9B: 2e12)."""
    source = HFCheckpoint(hf_dir, name=name)
    meta = {"tokens": int(tokens), "source": {"hf": str(Path(hf_dir).resolve())}}
    path = write_native_checkpoint(out, source, meta, dtype, progress=progress)
    comment = f"Imported from the Hugging Face directory {Path(hf_dir).resolve()}."
    (path / "model_config.yaml").write_text(model_config_yaml(source.model_config, comment))
    return path


@contextlib.contextmanager
def _staging(final: Path):
    """A temporary sibling of `final` to write into: renamed to `final` when the block succeeds (an
    empty `final` folder is replaced), removed when it fails, so no half-written output is left."""
    tmp = final.with_name(f".tmp_{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        final.rmdir()
    os.replace(tmp, final)


def _progress(enabled: bool, total: int, desc: str):
    if enabled:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="tensor")

    class _Null:
        def update(self, n: int = 1) -> None: ...
        def close(self) -> None: ...

    return _Null()
