"""The CLIP BPE vocabulary, derived from the file OpenAI and OpenCLIP ship.

Provenance: weights/data/bpe_simple_vocab_16e6.txt.gz is copied unchanged from the open-clip-torch 3.3.0
wheel on PyPI (open_clip/bpe_simple_vocab_16e6.txt.gz, sha256 924691ac...6804a), MIT licence
(weights/data/LICENSE.open_clip). It is the same merge list OpenAI's CLIP and Stable Diffusion's tokenizers use;
vocab.json / merges.txt in the Hugging Face layout are derived from it here, as CLIP's SimpleTokenizer does.
"""
import gzip
import json
from functools import lru_cache
from pathlib import Path

BPE_FILE = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48894 merges: 256 bytes ×2 + merges + 2 specials = 49408 ids


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable-character table (CLIP reuses it).

    Insertion order matters: it is the id order of the first 256 vocabulary entries (printable bytes first,
    then the remaining bytes mapped to unused code points from 256 up)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in printable}
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + len(chars) - len(printable))
    return chars


@lru_cache(maxsize=1)
def merges() -> list[tuple[str, str]]:
    lines = gzip.open(BPE_FILE, "rt", encoding="utf-8").read().split("\n")
    return [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # line 0 is the "#version" header


@lru_cache(maxsize=1)
def vocab() -> dict[str, int]:
    # Order fixed by CLIP: single byte-chars, the same with the end-of-word mark, merged tokens, specials.
    base = list(bytes_to_unicode().values())
    tokens = base + [t + "</w>" for t in base] + ["".join(m) for m in merges()] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


def write_hf_files(folder: Path) -> tuple[Path, Path]:
    """Write vocab.json and merges.txt (the transformers CLIPTokenizer layout) into folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps(vocab(), ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges()) + "\n", encoding="utf-8")
    return vocab_path, merges_path
