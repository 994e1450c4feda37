"""Prompt -> CLIP token ids (B, 77).

CLIP's byte-level BPE, its text normalisation and its special tokens, built on the `tokenizers` library
(the Rust backend that transformers' CLIPTokenizer is made of): the same pipeline as
transformers 5's CLIPTokenizer — NFC, whitespace runs to one space, lowercase; CLIP's split regex;
byte-level BPE with the "</w>" end-of-word suffix; <|startoftext|> … <|endoftext|> around each prompt —
so ids equal transformers' (tests/test_tokenizer.py), without importing transformers, which costs ~1 s of
every cold start.
"""
import json
import warnings
from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as BPETokenizer
from tokenizers.models import BPE

from . import vocab

MAX_LENGTH = 77  # CLIP's context: <|startoftext|> + 75 tokens + <|endoftext|>
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# SD1 (OpenAI CLIP) pads with <|endoftext|> (49407); SD2 (OpenCLIP) pads with id 0, the "!" token.
PADS = {"sd1": EOS, "sd2": "!"}


class PromptTruncatedWarning(UserWarning):
    """A prompt longer than CLIP's context: the tokens past it are dropped (as every SD pipeline does)."""


SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def clip_bpe(vocab_: dict, merges: list) -> BPETokenizer:
    """CLIP's tokenizer pipeline from a vocabulary and merge list (no special-token handling yet)."""
    tok = BPETokenizer(BPE(vocab=vocab_, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                           fuse_unk=False, unk_token=EOS))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return tok


class Tokenizer:
    """tokenizer(prompts: list[str]) -> LongTensor (B, 77) on the CPU, truncated and padded to 77 ids."""

    model_max_length = MAX_LENGTH

    def __init__(self, bpe: BPETokenizer, pad_token: str = EOS, source: str = ""):
        # The special tokens are matched whole in the text. As in transformers, that includes the pad token:
        # with SD2's "!" every "!" of a prompt becomes id 0 ("!!!" -> 0 0 0, not the BPE token 995).
        bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (BOS, EOS, pad_token)])
        self.bos_token_id, self.eos_token_id = bpe.token_to_id(BOS), bpe.token_to_id(EOS)
        self.pad_token, self.pad_token_id = pad_token, bpe.token_to_id(pad_token)
        if None in (self.bos_token_id, self.eos_token_id, self.pad_token_id):
            raise ValueError(f"{source or 'tokenizer'}: the vocabulary lacks {BOS}, {EOS} or the pad {pad_token!r}")
        bpe.post_processor = processors.RobertaProcessing((EOS, self.eos_token_id), (BOS, self.bos_token_id),
                                                          trim_offsets=False, add_prefix_space=False)
        # Truncation keeps the closing <|endoftext|>: a long prompt ends "... token_75 <|endoftext|>".
        bpe.enable_truncation(MAX_LENGTH)
        bpe.enable_padding(length=MAX_LENGTH, pad_id=self.pad_token_id, pad_token=pad_token)
        self.bpe, self.source = bpe, source

    def __call__(self, prompts: list[str] | str) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        encoded = self.bpe.encode_batch(prompts)
        warn_truncated(prompts, encoded)
        return torch.tensor([e.ids for e in encoded], dtype=torch.int64).view(-1, MAX_LENGTH)

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, pad_token_id={self.pad_token_id})"

    @classmethod
    def from_folder(cls, path: str | Path) -> "Tokenizer":
        """A diffusers tokenizer/ folder (or a model folder containing one): vocab.json + merges.txt or
        tokenizer.json; tokenizer_config.json, else special_tokens_map.json, names the pad token."""
        folder = Path(path)
        if (folder / "tokenizer").is_dir():
            folder = folder / "tokenizer"
        has_bpe = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
        if has_bpe:
            merges = [tuple(line.split()) for line in (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
                      if line.strip() and not line.startswith("#version")]
            bpe = clip_bpe(json.loads((folder / "vocab.json").read_text(encoding="utf-8")), merges)
        elif (folder / "tokenizer.json").is_file():
            bpe = BPETokenizer.from_file(str(folder / "tokenizer.json"))
        else:
            raise FileNotFoundError(f"no CLIP tokenizer files in {folder}: expected vocab.json + merges.txt "
                                    f"or tokenizer.json")
        return cls(bpe, _pad_token(folder), source=str(folder))

    @classmethod
    def bundled(cls, pad: str = "sd1") -> "Tokenizer":
        """The CLIP vocabulary shipped with the engine (for single-file checkpoints, which carry none).
        pad="sd1": pad with <|endoftext|> (49407); pad="sd2": pad with "!" (id 0)."""
        if pad not in PADS:
            raise ValueError(f"pad must be one of {sorted(PADS)}, got {pad!r}")
        return cls(_bundled_bpe(), PADS[pad], source=f"bundled:{pad}")


def warn_truncated(prompts, encoded) -> None:
    """One PromptTruncatedWarning per distinct prompt that lost tokens, naming how many. The overflow pieces
    carry the dropped tokens, each framed by <|startoftext|> … <|endoftext|> and padded (attention 0)."""
    for prompt in dict.fromkeys(p for p, e in zip(prompts, encoded) if e.overflowing):
        e = encoded[prompts.index(prompt)]
        dropped = sum(sum(o.attention_mask) - 2 for o in e.overflowing)
        kept = MAX_LENGTH - 2
        short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        warnings.warn(f"prompt {short!r} is {kept + dropped} tokens long; CLIP reads {kept} (a {MAX_LENGTH}-token "
                      f"context with its start and end tokens): the last {dropped} tokens were dropped",
                      PromptTruncatedWarning, stacklevel=3)


def _pad_token(folder: Path) -> str:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = folder / name
        if f.is_file():
            pad = json.loads(f.read_text(encoding="utf-8")).get("pad_token")
            if isinstance(pad, dict):  # an AddedToken serialised as {"content": ...}
                pad = pad.get("content")
            if pad:
                return pad
    return EOS  # CLIP's (and transformers') default


@lru_cache(maxsize=1)
def _bundled_bpe_parts():
    return vocab.vocab(), vocab.merges()


def _bundled_bpe() -> BPETokenizer:
    # A fresh pipeline each time: the Tokenizer adds its own pad token to it.
    return clip_bpe(*_bundled_bpe_parts())
