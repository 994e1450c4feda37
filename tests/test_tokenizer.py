"""weights.tokenizer.Tokenizer against transformers' CLIPTokenizer built from the same files."""
import json
import shutil

import pytest
import torch
from transformers import CLIPTokenizer

from diffedit_engine.weights import vocab
from diffedit_engine.weights.tokenizer import PromptTruncatedWarning, Tokenizer

PROMPTS = [
    "",
    "a photo of a cat",
    "!!!",
    "café naïve 東京 🐱",
    " ".join(f"word{i}" for i in range(60)),  # well over 77 tokens
    "A PHOTO OF A Cat On The MOON",
    "a   photo \t of\n\na    cat  ",
    "it's a dog's life, isn't it? (masterpiece:1.2), 8k",
]
PAD = {"sd1": 49407, "sd2": 0}
VARIANT = {"sd1": "sd1", "sd2": "sd2"}  # tiny variant whose tokenizer pads like each pad style


def encode(tok, prompts=PROMPTS) -> torch.Tensor:
    """tok(prompts), asserting the truncation warning PROMPTS' long prompt is there to cause."""
    with pytest.warns(PromptTruncatedWarning, match="tokens were dropped"):
        return tok(prompts)


def reference_ids(hf, prompts=PROMPTS) -> torch.Tensor:
    return hf(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


@pytest.mark.parametrize("pad", ["sd1", "sd2"])
def test_folder_matches_transformers(tiny_folder, pad):
    folder = tiny_folder(VARIANT[pad]) / "tokenizer"
    tok = Tokenizer.from_folder(folder)
    ids = encode(tok)
    assert ids.dtype == torch.int64 and ids.shape == (len(PROMPTS), 77) and ids.device.type == "cpu"
    assert tok.pad_token_id == PAD[pad] and tok.model_max_length == 77
    assert torch.equal(ids, reference_ids(CLIPTokenizer.from_pretrained(folder)))
    # Built straight from vocab.json + merges.txt with the pad token named: the same ids.
    direct = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=tok.pad_token)
    assert torch.equal(ids, reference_ids(direct))
    # The model folder (with a tokenizer/ inside) works too.
    assert torch.equal(encode(Tokenizer.from_folder(folder.parent)), ids)


@pytest.mark.parametrize("pad", ["sd1", "sd2"])
def test_bundled_matches_folder(tiny_folder, pad):
    tok = Tokenizer.bundled(pad)
    assert tok.pad_token_id == PAD[pad] and tok.model_max_length == 77
    assert torch.equal(encode(tok), encode(Tokenizer.from_folder(tiny_folder(VARIANT[pad]) / "tokenizer")))


@pytest.mark.parametrize("pad", ["sd1", "sd2"])
def test_known_ids(pad):
    tok = Tokenizer.bundled(pad)
    ids = tok(["a photo of a cat", "", "!!!"])
    p = PAD[pad]
    assert ids[0].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407] + [p] * 70
    assert ids[1].tolist() == [49406, 49407] + [p] * 75
    # "!!!" is one BPE token (995) — except where "!" is the pad: transformers then treats it as a special
    # token and splits every "!" off as id 0, as SD2 pipelines built on transformers have always done.
    assert ids[2, :5].tolist() == ([49406, 995, 49407, p, p] if pad == "sd1" else [49406, 0, 0, 0, 49407])
    with pytest.warns(PromptTruncatedWarning, match="the last 25 tokens were dropped"):
        long = tok([" ".join(["cat"] * 100)])[0]
    assert long.tolist() == [49406] + [2368] * 75 + [49407]  # truncation keeps the closing EOS
    assert torch.equal(tok("a photo of a cat"), ids[:1])  # a bare string is a batch of one
    # Case and runs of whitespace are normalised away.
    assert torch.equal(tok(["A  PHOTO of\ta   cat"]), ids[:1])


def test_file_layouts(tiny_folder, tmp_path):
    """vocab.json + merges.txt alone, tokenizer.json alone, and the pad token from special_tokens_map.json."""
    src = tiny_folder("sd2") / "tokenizer"
    want = encode(Tokenizer.from_folder(src))

    bpe = tmp_path / "bpe"
    bpe.mkdir()
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(src / f, bpe / f)
    tok = Tokenizer.from_folder(bpe)
    assert tok.pad_token_id == 49407  # no config: transformers' default pad, <|endoftext|>
    assert torch.equal(encode(tok), encode(Tokenizer.bundled("sd1")))
    (bpe / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))
    assert torch.equal(encode(Tokenizer.from_folder(bpe)), want)

    tj = tmp_path / "tj"
    tj.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, tj / f)
    tok = Tokenizer.from_folder(tj)
    assert tok.pad_token_id == 0 and torch.equal(encode(tok), want)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        Tokenizer.from_folder(tmp_path)
    vocab.write_hf_files(tmp_path)
    (tmp_path / "merges.txt").unlink()  # vocab.json alone is not a tokenizer
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        Tokenizer.from_folder(tmp_path)
    with pytest.raises(ValueError, match="pad"):
        Tokenizer.bundled("sdxl")
