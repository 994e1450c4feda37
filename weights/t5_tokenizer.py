"""Prompt -> T5 token ids (B, max_length), as SD 3.x (256 tokens) and FLUX.1 (512) feed their T5 encoder.

T5's tokenizer is a SentencePiece Unigram model: the vocabulary as (piece, log-probability) pairs, <pad>=0,
</s>=1, <unk>=2, then the pieces, then the sentinels <extra_id_99> … <extra_id_0>. Text is normalised with the
model's precompiled character map (NFKC-like), split on whitespace (runs of spaces count once, leading and trailing
ones not at all), each word prefixed with "▁", cut into pieces by Viterbi over the piece scores, and closed with </s>.
That is the pipeline transformers 5's T5Tokenizer (= T5TokenizerFast) builds from a folder's tokenizer.json or
spiece.model, whatever pipeline a tokenizer.json itself declares (only its vocabulary and character map are
read); this module builds the same one on the `tokenizers` library, so ids equal transformers'
(tests/test_t5.py) without importing it. spiece.model is read with a small protobuf reader below (no sentencepiece
or protobuf package).
"""
import base64
import json
import struct
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
T5_IDS = {PAD: 0, EOS: 1, UNK: 2}  # fixed by T5's vocabulary; transformers assumes them too


class T5Tokenizer:
    """tokenizer(prompts) -> LongTensor (B, max_length) on the CPU: ids, </s>, then <pad> (0); a longer prompt is
    cut so that </s> stays last (transformers' truncation=True, padding="max_length")."""

    def __init__(self, vocab: list[tuple[str, float]], charsmap: bytes | None, max_length: int = 256,
                 extra_ids: int = 100, source: str = ""):
        if [p for p, _ in vocab[:3]] != list(T5_IDS):
            raise ValueError(f"{source or 'T5 tokenizer'}: the vocabulary does not start with <pad>, </s>, <unk>")
        tok = Tokenizer(Unigram(vocab, unk_id=T5_IDS[UNK], byte_fallback=False))
        if charsmap:
            tok.normalizer = normalizers.Precompiled(charsmap)
        # Whitespace split first: extra, leading and trailing spaces vanish, as in SentencePiece's normaliser.
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
        # Special tokens are matched whole in the prompt text ("</s>" typed in a prompt is id 1), sentinels included;
        # a sentinel the vocabulary lacks is appended to it, as transformers does.
        specials = [PAD, EOS, UNK, *(f"<extra_id_{i}>" for i in range(extra_ids))]
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, T5_IDS[EOS])])
        tok.enable_truncation(max_length)  # keeps room for the </s> the post-processor adds
        tok.enable_padding(length=max_length, pad_id=T5_IDS[PAD], pad_token=PAD)
        self.tok, self.max_length, self.source = tok, max_length, source

    def __call__(self, prompts: list[str] | str) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = [e.ids for e in self.tok.encode_batch(prompts)]
        return torch.tensor(ids, dtype=torch.int64).view(len(prompts), self.max_length)

    def __repr__(self) -> str:
        return f"T5Tokenizer(source={self.source!r}, max_length={self.max_length})"

    @classmethod
    def from_folder(cls, folder: str | Path, max_length: int = 256) -> "T5Tokenizer":
        """A T5 tokenizer folder (SD 3's tokenizer_3/, FLUX's tokenizer_2/): tokenizer.json, else spiece.model;
        tokenizer_config.json's extra_ids (default 100) gives the sentinel count."""
        folder = Path(folder)
        config = folder / "tokenizer_config.json"
        extra_ids = json.loads(config.read_text(encoding="utf-8")).get("extra_ids", 100) if config.is_file() else 100
        if (folder / "tokenizer.json").is_file():
            vocab, charsmap = read_tokenizer_json(folder / "tokenizer.json")
        elif (folder / "spiece.model").is_file():
            vocab, charsmap = read_spiece(folder / "spiece.model")
            # spiece.model holds no sentinels: transformers appends them to the pieces, <extra_id_99> first.
            vocab += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(extra_ids))]
        else:
            raise FileNotFoundError(f"no T5 tokenizer in {folder}: expected tokenizer.json or spiece.model")
        return cls(vocab, charsmap, max_length, extra_ids, source=str(folder))


def read_tokenizer_json(path: Path) -> tuple[list[tuple[str, float]], bytes | None]:
    """(vocabulary, precompiled character map or None) of a Unigram tokenizer.json."""
    d = json.loads(Path(path).read_text(encoding="utf-8"))
    model = d.get("model") or {}
    if model.get("type") != "Unigram":
        raise ValueError(f"{path}: not a T5 (Unigram) tokenizer, model type {model.get('type')!r}")
    norm = d.get("normalizer") or {}
    found = [n for n in (norm.get("normalizers") or [norm]) if n.get("type") == "Precompiled"]
    charsmap = base64.b64decode(found[0]["precompiled_charsmap"]) if found and found[0].get("precompiled_charsmap") \
        else None
    return [(p, float(s)) for p, s in model["vocab"]], charsmap


# SentencePiece's ModelProto (sentencepiece_model.proto), the fields read here:
# ModelProto: 1 pieces (repeated message), 2 trainer_spec, 3 normalizer_spec
# SentencePiece: 1 piece (string), 2 score (float); TrainerSpec: 3 model_type (1 = Unigram), 35 byte_fallback
# NormalizerSpec: 2 precompiled_charsmap (bytes)
def _fields(buf: bytes):
    """(field number, value) of each field of one protobuf message: ints for varints, bytes for length-delimited,
    4/8 raw bytes for fixed32/fixed64."""
    i = 0

    def varint():
        nonlocal i
        out = shift = 0
        while True:
            b = buf[i]
            i += 1
            out |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return out

    while i < len(buf):
        key = varint()
        kind = key & 7
        if kind == 0:
            yield key >> 3, varint()
        elif kind == 2:
            n = varint()
            yield key >> 3, buf[i:i + n]
            i += n
        elif kind in (1, 5):
            n = 8 if kind == 1 else 4
            yield key >> 3, buf[i:i + n]
            i += n
        else:
            raise ValueError(f"unsupported protobuf wire type {kind}")


def read_spiece(path: Path) -> tuple[list[tuple[str, float]], bytes | None]:
    """(vocabulary, precompiled character map or None) of a SentencePiece Unigram model file."""
    vocab, charsmap, model_type, byte_fallback = [], None, 1, 0
    try:
        for field, value in _fields(Path(path).read_bytes()):
            if field == 1:
                piece = dict(_fields(value))
                vocab.append((piece.get(1, b"").decode("utf-8"), struct.unpack("<f", piece.get(2, bytes(4)))[0]))
            elif field == 2:
                spec = dict(_fields(value))
                model_type, byte_fallback = spec.get(3, 1), spec.get(35, 0)
            elif field == 3:
                charsmap = dict(_fields(value)).get(2) or None
    except (IndexError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: not a SentencePiece model ({e})") from None
    if model_type != 1 or byte_fallback:
        raise ValueError(f"{path}: not a T5 SentencePiece model (model_type {model_type}, byte_fallback "
                         f"{bool(byte_fallback)}); T5 is Unigram without byte fallback")
    return vocab, charsmap
