"""Import a Hugging Face Bamba directory (e.g. a local copy of ibm-fms/Bamba-9B) or a GraniteMoeHybrid one
(Granite 4.0 hybrid) as a native checkpoint.

    python scripts/import_hf.py --hf /models/Bamba-9B --out checkpoints/bamba-9b-2T --tokens 2e12 [--dtype fp32]

The output is a weights-only checkpoint that `hybrid_train.load_model` and `checkpoint.init_from`
accept, plus `model_config.yaml` (copy it to conf/model/ to train this architecture) and the HF
directory's tokenizer files under `tokenizer/` (use that folder as `data.tokenizer`). Tensors are read
with safetensors slices and written one at a time.
"""

from __future__ import annotations

import argparse

from hybrid_train.train.export import import_hf, parse_dtype


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True,
                        help="HF Bamba or GraniteMoeHybrid directory: config.json + *.safetensors")
    parser.add_argument("--out", required=True, help="native checkpoint directory to create")
    parser.add_argument("--dtype", default="auto", help="auto (as stored), bf16, fp16 or fp32")
    parser.add_argument("--name", default=None, help="model name in the written config (default: the HF dir's name)")
    parser.add_argument("--tokens", type=float, default=0,
                        help="tokens the model was trained on, recorded for the next stage's start_tokens check")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    path = import_hf(args.hf, args.out, parse_dtype(args.dtype), args.name, int(args.tokens),
                     progress=not args.no_progress)
    print(f"wrote {path} (model config: {path / 'model_config.yaml'})")


if __name__ == "__main__":
    main()
