"""Prompt -> CLIP token ids (B, 77). Wraps transformers' CLIPTokenizer, the engine's only run-time use of
transformers: CLIP's BPE, its text normalisation and its special tokens are exactly what the checkpoints were
trained with, and reimplementing them buys nothing.
"""
from functools import lru_cache
from pathlib import Path

import torch

from weights import vocab

MAX_LENGTH = 77  # CLIP's context: <|startoftext|> + 75 tokens + <|endoftext|>
# SD1 (OpenAI CLIP) pads with <|endoftext|> (49407); SD2 (OpenCLIP) pads with id 0, the "!" token.
PADS = {"sd1": "<|endoftext|>", "sd2": "!"}


class Tokenizer:
    """tokenizer(prompts: list[str]) -> LongTensor (B, 77) on the CPU, truncated and padded to 77 ids."""

    model_max_length = MAX_LENGTH

    def __init__(self, hf_tokenizer, source: str = ""):
        self.hf = hf_tokenizer
        self.source = source
        self.pad_token_id: int = hf_tokenizer.pad_token_id
        self.bos_token_id: int = hf_tokenizer.bos_token_id
        self.eos_token_id: int = hf_tokenizer.eos_token_id

    def __call__(self, prompts: list[str] | str) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        # Truncation keeps the closing <|endoftext|>: a long prompt ends "... token_75 <|endoftext|>".
        out = self.hf(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
        return out.input_ids  # (B, 77) int64

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, pad_token_id={self.pad_token_id})"

    @classmethod
    def from_folder(cls, path: str | Path) -> "Tokenizer":
        """A diffusers tokenizer/ folder (or a model folder containing one): vocab.json + merges.txt or
        tokenizer.json; tokenizer_config.json / special_tokens_map.json, where present, choose the pad token."""
        from transformers import CLIPTokenizer

        folder = Path(path)
        if (folder / "tokenizer").is_dir():
            folder = folder / "tokenizer"
        has_bpe = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
        if not (has_bpe or (folder / "tokenizer.json").is_file()):
            # transformers would silently build an empty tokenizer from a folder without vocabulary files.
            raise FileNotFoundError(f"no CLIP tokenizer files in {folder}: expected vocab.json + merges.txt "
                                    f"or tokenizer.json")
        hf = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        return cls(hf, source=str(folder))

    @classmethod
    def bundled(cls, pad: str = "sd1") -> "Tokenizer":
        """The CLIP vocabulary shipped with the engine (for single-file checkpoints, which carry none).
        pad="sd1": pad with <|endoftext|> (49407); pad="sd2": pad with "!" (id 0)."""
        if pad not in PADS:
            raise ValueError(f"pad must be one of {sorted(PADS)}, got {pad!r}")
        return cls(_bundled_hf(pad), source=f"bundled:{pad}")


@lru_cache(maxsize=None)
def _bundled_hf(pad: str):
    from transformers import CLIPTokenizer

    # Built from in-memory vocab and merges: nothing is written to disk.
    return CLIPTokenizer(vocab=vocab.vocab(), merges=vocab.merges(), pad_token=PADS[pad])
