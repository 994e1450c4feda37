"""The T5 encoder (engine/models/t5.py) and tokenizer (weights/t5_tokenizer.py) against transformers' T5EncoderModel
and T5TokenizerFast on tiny models built here: random-weight encoders written by save_pretrained, Unigram tokenizers
trained on a few hundred captions (with `tokenizers`, and with SentencePiece for a real spiece.model and its
NFKC character map). SentencePiece is a test-only dependency (it writes the spiece.model the engine reads itself).
"""
import io
import json
import random

import pytest
import sentencepiece as spm
import torch
import transformers
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

from diffedit_engine.engine.models.t5 import (T5Config, T5EncoderModel, clamp_fp16, relative_position_bucket,
                                              t5_dtype, t5_key)
from diffedit_engine.weights.t5_tokenizer import T5Tokenizer, read_spiece

torch.set_num_threads(1)

CONFIGS = {
    # T5 v1.1 as SD 3 / FLUX use it (gated tanh-GELU), few buckets: most distances of a 40-token prompt saturate.
    "v1.1": dict(d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2, relative_attention_num_buckets=8,
                 relative_attention_max_distance=20, feed_forward_proj="gated-gelu"),
    # v1.1 with the real model's bucket settings (32, 128) and three blocks (the shared bias reaches every block).
    "v1.1-32": dict(d_model=64, d_kv=16, num_heads=4, d_ff=96, num_layers=3, relative_attention_num_buckets=32,
                    relative_attention_max_distance=128, feed_forward_proj="gated-gelu"),
    # T5 1.0: plain ReLU feed-forward (wi, wo), d_model != heads * d_kv.
    "t5-1.0": dict(d_model=48, d_kv=8, num_heads=3, d_ff=64, num_layers=2, relative_attention_num_buckets=16,
                   relative_attention_max_distance=32, feed_forward_proj="relu"),
}
VOCAB, L = 96, 40
FP32_TOL = 1e-5
# fp16/bf16: the engine runs transformers' operations in the same order (fp32 mean square, the written-out tanh
# GELU, fp32 wo under fp16, the fp16 clamp), so it agrees far inside the dtype's own error against fp32 (~1e-2 of
# the output's scale): measured bit-exact on CPU; the bound leaves room for kernel differences only.
HALF_TOL = 1e-3


def ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(3, VOCAB, (3, L), generator=g)
    x[0, 12:] = 0  # </s> then <pad> (0): SD 3 attends to the padding, so it changes the states
    x[0, 11] = 1
    x[1, 30:] = 0
    return x


def _randomize(model: torch.nn.Module) -> None:
    """Random values of a sane scale everywhere (norm scales near 1), so wrong wiring cannot hide behind inits."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "relative_attention_bias" in name or "shared" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


@pytest.fixture(scope="module", params=list(CONFIGS))
def saved(request, tmp_path_factory):
    """(config name, folder written by T5EncoderModel.save_pretrained, the transformers model in fp32)."""
    cfg = transformers.T5Config(vocab_size=VOCAB, **CONFIGS[request.param])
    ref = transformers.T5EncoderModel(cfg).eval()
    _randomize(ref)
    folder = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(folder)
    return request.param, folder, ref


def load(folder, dtype=torch.float32, state=None) -> T5EncoderModel:
    """What the loader does: config.json -> T5Config, stored keys through t5_key (and t5_dtype), strict assign-load
    on the meta device."""
    cfg = T5Config.from_json(json.loads((folder / "config.json").read_text()))
    stored = state if state is not None else load_file(str(folder / "model.safetensors"))
    sd = {t5_key(k, stored.keys()): v for k, v in stored.items()}
    sd.pop(None, None)
    with torch.device("meta"):
        model = T5EncoderModel(cfg)
    model.load_state_dict({k: v.to(t5_dtype(k, dtype)) for k, v in sd.items()}, strict=True, assign=True)
    return model.eval()


@torch.no_grad()
def test_fp32_matches_transformers(saved):
    name, folder, ref = saved
    stored = load_file(str(folder / "model.safetensors"))
    assert "shared.weight" in stored and "encoder.embed_tokens.weight" not in stored  # what save_pretrained writes
    want = ref(ids()).last_hidden_state
    got = load(folder)(ids())
    diff = (got - want).abs().max().item()
    print(f"{name}: fp32 max abs diff {diff:.2e} (output max {want.abs().max():.2f})")
    assert got.shape == (3, L, ref.config.d_model) and diff <= FP32_TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@torch.no_grad()
def test_half_matches_transformers(saved, dtype):
    """transformers' from_pretrained(dtype=...) against the engine loaded with t5_dtype: fp16 keeps wo in fp32
    there (the residual stream turns fp32 after block 0), bf16 does not."""
    name, folder, ref = saved
    half = transformers.T5EncoderModel.from_pretrained(folder, dtype=dtype).eval()
    wo = half.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype
    assert wo == (torch.float32 if dtype == torch.float16 else dtype)
    want = half(ids()).last_hidden_state.float()
    got = load(folder, dtype)(ids())
    assert got.dtype == dtype
    scale = want.abs().max().item()
    diff = (got.float() - want).abs().max().item()
    own = (want - ref(ids()).last_hidden_state).abs().max().item()  # the dtype's own error against fp32
    print(f"{name} {dtype}: max abs diff {diff:.2e} vs transformers {dtype}; {own:.2e} vs fp32")
    assert diff <= HALF_TOL * scale and own > 10 * diff


@torch.no_grad()
def test_fp16_overflow_is_clamped_as_transformers_does(saved):
    """All-fp16 models (wo too): a feed-forward output beyond the fp16 range becomes inf, which transformers clamps
    to ±(65504 − 1000) after each residual add; without that the next RMSNorm makes NaN."""
    name, folder, _ = saved
    state = load_file(str(folder / "model.safetensors"))
    state["encoder.block.0.layer.1.DenseReluDense.wo.weight"] *= 3e4
    ref = transformers.T5EncoderModel(transformers.T5Config.from_pretrained(folder))
    ref.load_state_dict(state, strict=False)  # the tied encoder.embed_tokens follows shared
    ref = ref.half().eval()
    ours = load(folder, state=state).half()
    x = ours.shared(ids())
    bias = ours.encoder.position_bias(L, x.device)
    block0 = ours.encoder.block[0]
    assert torch.isinf(block0.layer[1](clamp_fp16(block0.layer[0](x, bias)))).any()  # the case is exercised
    want = ref(ids()).last_hidden_state
    got = ours(ids())
    assert torch.isfinite(want).all() and torch.equal(got, want)


@torch.no_grad()
def test_stored_embedding_names(saved):
    """Files holding encoder.embed_tokens.weight alone, or beside shared.weight, or a full encoder-decoder T5."""
    name, folder, ref = saved
    want = ref(ids()).last_hidden_state
    state = load_file(str(folder / "model.safetensors"))
    alone = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v for k, v in state.items()}
    both = {**state, "encoder.embed_tokens.weight": state["shared.weight"]}
    for variant in (alone, both):
        assert (load(folder, state=variant)(ids()) - want).abs().max() <= FP32_TOL
    full = transformers.T5ForConditionalGeneration(transformers.T5Config.from_pretrained(folder))
    full.encoder.load_state_dict({k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")},
                                 strict=False)
    full.shared.weight.data.copy_(state["shared.weight"])
    full_dir = folder / "full"
    full.save_pretrained(full_dir)
    stored = load_file(str(full_dir / "model.safetensors"))
    assert any(k.startswith("decoder.") for k in stored)
    assert (load(folder, state=stored)(ids()) - want).abs().max() <= FP32_TOL
    assert t5_key("lm_head.weight") is None and t5_key("encoder.final_layer_norm.weight") == \
        "encoder.final_layer_norm.weight"


@pytest.mark.parametrize("buckets,max_distance", [(8, 20), (32, 128), (16, 16), (32, 64)])
def test_relative_position_bucket(buckets, max_distance):
    pos = torch.arange(300)
    rel = pos[None, :] - pos[:, None]
    want = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        rel, bidirectional=True, num_buckets=buckets, max_distance=max_distance)
    assert torch.equal(relative_position_bucket(rel, buckets, max_distance), want)


def test_config_from_json_asserts():
    real = dict(d_ff=10240, d_kv=64, d_model=4096, dense_act_fn="gelu_new", feed_forward_proj="gated-gelu",
                is_gated_act=True, model_type="t5", num_heads=64, num_layers=24, vocab_size=32128,
                architectures=["T5EncoderModel"], dropout_rate=0.1, tie_word_embeddings=False)  # SD 3's text_encoder_3
    cfg = T5Config.from_json(real)
    assert (cfg.d_model, cfg.num_layers, cfg.dense_act_fn, cfg.is_gated_act) == (4096, 24, "gelu_new", True)
    for bad in ({"feed_forward_proj": "gated-silu"}, {"feed_forward_proj": "gated-gelu-x"}, {"is_decoder": True},
                {"model_type": "mt5x"}, {"dense_act_fn": "relu"}):
        with pytest.raises(AssertionError):
            T5Config.from_json({**real, **bad})


# ---- tokenizer ----------------------------------------------------------------------------------------------------
WORDS = ("a photo of cat dog red blue green circle square triangle on the white background yellow big small house "
         "tree mountain river sky sunset painting portrait city street car night light water flower garden "
         "astronaut riding horse space moon").split()
PROMPTS = ["", "a photo of a cat", "  a   photo\tof  a cat  ", "a cat " * 200, "a " * 15, "a " * 14,
           "Ünïcödé café naïve", "ｆｕｌｌ　ｗｉｄｔｈ ① ﬁne", "日本語 テキスト zebra", "a\u00a0b\u3000c", "\n\nline\nbreak ",
           "quick-brown fox!?", "xyz qq", "a </s> b <extra_id_0> c <extra_id_7>", "a<pad>b", "<unk>"]
SPECIAL = ("</s>", "<pad>", "<unk>", "<extra_id")  # prompts SentencePiece itself reads as plain text


def captions(n=400):
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)] + \
        ["Ünïcödé café naïve", "ｆｕｌｌ　ｗｉｄｔｈ", "① ﬁne", "日本語 テキスト"]


@pytest.fixture(scope="module")
def tok_folders(tmp_path_factory):
    """{name: folder}: spiece.model only (SentencePiece-trained, NFKC character map); the tokenizer.json that
    transformers writes from it; the same file declaring the older converter's pipeline (Strip + Replace("  +",
    "▁"), Metaspace only: transformers 5 and the engine build their own pipeline whatever the file declares); a
    Unigram trained with `tokenizers`
    (no character map). Plus the raw spiece bytes for the SentencePiece oracle."""
    root = tmp_path_factory.mktemp("t5tok")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(captions()), model_writer=model, vocab_size=80,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   normalization_rule_name="nmt_nfkc", character_coverage=1.0, minloglevel=2)
    out = {"spiece": root / "spiece"}
    out["spiece"].mkdir()
    (out["spiece"] / "spiece.model").write_bytes(model.getvalue())
    out["json"] = root / "json"
    transformers.T5TokenizerFast.from_pretrained(out["spiece"]).save_pretrained(out["json"])
    old = json.loads((out["json"] / "tokenizer.json").read_text())
    charsmap = next(n for n in [old["normalizer"], *old["normalizer"].get("normalizers", [])]
                    if n["type"] == "Precompiled")
    old["normalizer"] = {"type": "Sequence", "normalizers": [
        charsmap, {"type": "Strip", "strip_left": False, "strip_right": True},
        {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": "▁"}]}
    old["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    out["json-old"] = root / "json-old"
    out["json-old"].mkdir()
    (out["json-old"] / "tokenizer.json").write_text(json.dumps(old))

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace()])
    tok.train_from_iterator(captions(), trainers.UnigramTrainer(
        vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    out["tokenizers"] = root / "tokenizers"
    out["tokenizers"].mkdir()
    tok.save(str(out["tokenizers"] / "tokenizer.json"))
    return out, model.getvalue()


@pytest.mark.parametrize("length", [16, 256])
@pytest.mark.parametrize("name", ["spiece", "json", "json-old", "tokenizers"])
def test_tokenizer_matches_transformers(tok_folders, name, length):
    folder = tok_folders[0][name]
    want = transformers.T5TokenizerFast.from_pretrained(folder)(
        PROMPTS, padding="max_length", max_length=length, truncation=True).input_ids
    got = T5Tokenizer.from_folder(folder, max_length=length)(PROMPTS)
    assert got.dtype == torch.int64 and got.shape == (len(PROMPTS), length)
    bad = [(p, w, g) for p, w, g in zip(PROMPTS, want, got.tolist()) if w != g]
    print(f"{name} L={length}: {len(PROMPTS) - len(bad)}/{len(PROMPTS)} prompts equal id for id")
    assert not bad, bad[0]
    long = got[PROMPTS.index("a cat " * 200)]
    assert long[-1] == 1 and 0 not in long.tolist()  # truncated: </s> kept last, no padding


def test_tokenizer_matches_sentencepiece(tok_folders):
    """An oracle outside transformers: SentencePiece's own encoding, + </s>, cut and padded to 16."""
    folder, model = tok_folders[0]["spiece"], tok_folders[1]
    proc = spm.SentencePieceProcessor(model_proto=model)
    plain = [p for p in PROMPTS if not any(s in p for s in SPECIAL)]
    want = [(proc.encode(p)[:15] + [1] + [0] * 16)[:16] for p in plain]
    assert T5Tokenizer.from_folder(folder, max_length=16)(plain).tolist() == want
    vocab, charsmap = read_spiece(folder / "spiece.model")
    assert [p for p, _ in vocab] == [proc.id_to_piece(i) for i in range(proc.get_piece_size())]
    assert charsmap and len(charsmap) > 1000  # the NFKC map ("ｆｕｌｌ" -> "full" above depends on it)


def test_tokenizer_refuses(tmp_path, tok_folders):
    with pytest.raises(FileNotFoundError, match="tokenizer.json or spiece.model"):
        T5Tokenizer.from_folder(tmp_path)
    bpe = Tokenizer(models.BPE(vocab={"a": 0}, merges=[]))
    bpe.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="not a T5 \\(Unigram\\) tokenizer"):
        T5Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "spiece.model").write_bytes(b"\x0f\xff\xff")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        T5Tokenizer.from_folder(tmp_path)
