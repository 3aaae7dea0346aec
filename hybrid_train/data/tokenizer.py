"""Tokenizers: a built-in byte-level one (tests, smoke runs, no files needed) and a HF wrapper.

Both expose `encode(text) -> list[int]` and `encode_batch(texts) -> list[np.ndarray]` without special
tokens, `decode(ids)`, `bos_id`, `eos_id`, `vocab_size` and a `fingerprint` naming the exact vocabulary
(token files record it, so files from another tokenizer are refused); the packer adds BOS/EOS itself
so documents are delimited the same way for any tokenizer.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Union

import numpy as np

# Looked up in this order; the first one present in the vocabulary wins.
EOS_TOKENS = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<|eot_id|>")
BOS_TOKENS = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, plus BOS 256 and EOS 257."""

    bos_id = 256
    eos_id = 257
    vocab_size = 258
    fingerprint = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8) for text in texts]

    def decode(self, ids) -> str:
        # Special ids have no bytes; a document cut mid-character decodes with U+FFFD.
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizers` tokenizer.json (e.g. Llama-3's for Bamba: vocab 128256, eos 128001)."""

    def __init__(self, path: Union[str, Path]):
        from tokenizers import Tokenizer

        self.path = str(path)
        self._tok = Tokenizer.from_file(self.path)
        # Literal special-token strings inside web text ("...<|endoftext|>...") must stay text;
        # otherwise a document could inject an EOS into the middle of itself.
        self._tok.encode_special_tokens = True
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._first_id(EOS_TOKENS)
        if self.eos_id is None:
            raise ValueError(f"tokenizer {self.path} has none of the end-of-text tokens {EOS_TOKENS}")
        self.bos_id: Optional[int] = self._first_id(BOS_TOKENS)  # checked by the loader if add_bos
        self.fingerprint = hashlib.sha256(self._tok.to_str().encode()).hexdigest()[:16]

    def __reduce__(self):
        # Rebuilt from the file in worker processes, with the same settings as here.
        return (HFTokenizer, (self.path,))

    def _first_id(self, candidates) -> Optional[int]:
        for token in candidates:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return token_id
        return None

    def encode(self, text: str) -> list[int]:
        # Post-processors (e.g. Llama-3's BOS template) are not applied; BOS/EOS are the packer's job.
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        # One call for a block of documents: the Rust side runs them in parallel, without the GIL.
        dtype = np.uint16 if self.vocab_size <= 1 << 16 else np.uint32
        return [np.array(e.ids, dtype=dtype) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def build_tokenizer(spec: str):
    """Build from a spec: "byte", a tokenizer.json, or a folder containing a tokenizer.json."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path} (from data.tokenizer={spec!r})")
    return HFTokenizer(path)
