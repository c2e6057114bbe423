"""The text encoder: CLIP token ids equal open_clip's, tiny CLIP models of both kinds give the
embeddings they should, files round-trip, and bad input gets errors that name it."""

import copy
import logging

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.encoders.text import FrozenTextEncoder, open_clip_to_transformers
from ldm.encoders.tokenizer import build_clip_tokenizer

START, END = 49406, 49407
# Prompts whose ids a CLIPTokenizer gets right by itself.
PLAIN_PROMPTS = [
    "a red circle",
    "",
    " ",
    "A Photo of a CAT",
    "hello,world... it's 2024 & we're 100% sure",
    "  extra   spaces\tand\nnewlines  ",
    "don't can't I'M you'll we'd",
    "numbers 12345 3.14159",
    "café naïve résumé Ångström mañana",
    "日本語のテキスト",
    "emoji 🐱🚀 test",
    "x_y-z/w\\v (a) [b] {c}",
    "a" * 300,
]
# Prompts that also need the cleaning CLIP was trained with (ftfy, HTML entities), and "!!!",
# which a tokenizer whose pad token is "!" would split into three pad tokens.
CLEANED_PROMPTS = [
    "A Photo of a CAT!!!",
    "&amp; &lt;tag&gt;",
    "ﬁ ligature",
    "full-width ＡＢＣ ｈｅｌｌｏ",
    "quote “smart” ‘quotes’",
    "ΣΊΣΥΦΟΣ",
    "wow ! ! !",
]
TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 3},
}


def open_clip_ids(prompt: str) -> list[int]:
    tokenizer = open_clip.tokenizer.SimpleTokenizer()
    return [tokenizer.sot_token_id, *tokenizer.encode(prompt), tokenizer.eot_token_id]


def padded(ids: list[int], pad_id: int, length: int = 77) -> list[int]:
    return ids + [pad_id] * (length - len(ids))


@pytest.fixture(scope="module")
def tiny_clip_folder(tmp_path_factory):
    """A diffusers-layout folder with a random 2-layer CLIPTextModel and the real tokenizer."""
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
    )
    model = CLIPTextModel(config).eval()
    folder = tmp_path_factory.mktemp("pipeline")
    model.save_pretrained(folder / "text_encoder")
    build_clip_tokenizer(folder / "tokenizer")
    return folder, model


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    """A random tiny open_clip CLIP model (weights perturbed, so no zero bias hides a bug) and
    its whole state dict as a safetensors file."""
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_OPEN_CLIP).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("open_clip") / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


# ---------------------------------------------------------------------- tokenizer


def test_tokenizer_gives_the_real_clip_ids():
    tokenizer = build_clip_tokenizer()
    assert len(tokenizer) == 49408
    assert tokenizer("a red circle").input_ids == [START, 320, 736, 7117, END]
    for prompt in PLAIN_PROMPTS:
        assert tokenizer(prompt, verbose=False).input_ids == open_clip_ids(prompt), prompt


@pytest.mark.parametrize(("pad_token", "pad_id"), [("<|endoftext|>", END), ("!", 0)])
def test_tokenizer_pads_to_77_with_the_pad_token(pad_token, pad_id):
    tokenizer = build_clip_tokenizer(pad_token=pad_token)
    assert tokenizer.pad_token_id == pad_id and tokenizer.model_max_length == 77
    ids = tokenizer(["a red circle", ""], padding="max_length", return_tensors="pt").input_ids
    assert ids.shape == (2, 77)
    assert ids[0].tolist() == padded([START, 320, 736, 7117, END], pad_id)
    assert ids[1].tolist() == padded([START, END], pad_id)


def test_tokenizer_save_dir_round_trip(tmp_path):
    built = build_clip_tokenizer(tmp_path, pad_token="!")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tmp_path / name).is_file(), name
    loaded = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert loaded.pad_token_id == 0 and loaded.model_max_length == 77
    for prompt in PLAIN_PROMPTS:
        assert loaded(prompt, verbose=False).input_ids == built(prompt, verbose=False).input_ids


def test_unknown_pad_token_is_refused():
    with pytest.raises(ValueError, match="<pad>"):
        build_clip_tokenizer(pad_token="<pad>")


# ---------------------------------------------------------------------- transformers kind


def test_tokenize_equals_open_clip_for_every_prompt(tiny_clip_folder):
    encoder = FrozenTextEncoder.from_pretrained(tiny_clip_folder[0])
    prompts = PLAIN_PROMPTS[:-1] + CLEANED_PROMPTS
    ids = encoder.tokenize(prompts)
    assert ids.dtype == torch.int64 and ids.shape == (len(prompts), 77)
    for row, prompt in zip(ids.tolist(), prompts, strict=True):
        assert row == padded(open_clip_ids(prompt), END), prompt
    assert encoder.tokenize("a red circle").tolist() == [padded([START, 320, 736, 7117, END], END)]


def test_long_prompt_is_truncated_with_a_warning(tiny_clip_folder, caplog):
    encoder = FrozenTextEncoder.from_pretrained(tiny_clip_folder[0])
    prompt = " ".join(["word"] * 100)
    full = open_clip_ids(prompt)
    assert len(full) == 102
    assert encoder.count_tokens([prompt, "a red circle", ""]) == [102, 5, 2]
    with caplog.at_level(logging.WARNING, logger="ldm.encoders.text"):
        ids = encoder.tokenize([prompt, "a red circle"])
    assert ids.shape == (2, 77)
    assert ids[0].tolist() == [*full[:76], END]
    assert "102 tokens" in caplog.text and "last 25 were dropped" in caplog.text
    assert "word word" in caplog.text and prompt not in caplog.text  # shortened
    assert len(caplog.records) == 1  # none for the short prompt


def test_transformers_embeddings_are_the_last_hidden_state(tiny_clip_folder, tmp_path):
    folder, model = tiny_clip_folder
    encoder = FrozenTextEncoder.from_pretrained(folder)
    assert (encoder.kind, encoder.max_length, encoder.hidden_size) == ("transformers", 77, 32)
    prompts = ["a red circle", "", "A Photo of a CAT!!!"]
    context = encoder(prompts)
    ids = torch.tensor([padded(open_clip_ids(p), END) for p in prompts])
    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state
    assert context.shape == (3, 77, 32) and context.dtype == torch.float32
    assert expected.abs().max() > 0.5
    torch.testing.assert_close(context, expected, rtol=0, atol=0)
    torch.testing.assert_close(encoder("a red circle"), context[:1], rtol=0, atol=0)

    encoder.save_pretrained(tmp_path)
    reloaded = FrozenTextEncoder.from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded(prompts), context, rtol=0, atol=0)


def test_encoder_is_frozen_and_follows_its_dtype(tiny_clip_folder):
    encoder = FrozenTextEncoder.from_pretrained(tiny_clip_folder[0])
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()  # a training loop's .train() must not switch on dropout
    assert not encoder.training and not encoder.model.training
    assert encoder.device == torch.device("cpu") and encoder.dtype == torch.float32
    reference = encoder(["a red circle"])
    encoder.to(torch.float64)
    context = encoder(["a red circle"])
    assert encoder.dtype == torch.float64 and context.dtype == torch.float64
    torch.testing.assert_close(context.float(), reference, rtol=0, atol=1e-5)
    assert not context.requires_grad


# ---------------------------------------------------------------------- open_clip kind


def test_open_clip_embeddings_are_the_penultimate_block_then_ln_final(tiny_open_clip):
    model, path = tiny_open_clip
    encoder = FrozenTextEncoder.from_open_clip("tiny", path, model_config=TINY_OPEN_CLIP)
    assert (encoder.kind, encoder.max_length, encoder.hidden_size) == ("open_clip", 77, 32)
    prompts = ["a red circle", "", "A Photo of a CAT!!!", " ".join(["word"] * 100)]
    ids = open_clip.tokenize(prompts)  # pads with 0, truncates keeping the end token
    assert encoder.tokenize(prompts).tolist() == ids.tolist()
    assert ids[0, 5:].eq(0).all()

    cut = copy.deepcopy(model)
    cut.transformer.resblocks = cut.transformer.resblocks[:-1]
    with torch.no_grad():
        x = cut.token_embedding(ids) + cut.positional_embedding  # (B, L, D)
        expected = cut.ln_final(cut.transformer(x, attn_mask=cut.attn_mask))
        every_block = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    context = encoder(prompts)
    assert context.shape == (4, 77, 32)
    torch.testing.assert_close(context, expected, rtol=0, atol=1e-6)
    assert (context - every_block).abs().max() > 0.1  # the last block really is skipped
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not any(name.startswith("visual") for name, _ in encoder.named_parameters())


def test_open_clip_reads_pickled_state_dicts(tiny_open_clip, tmp_path):
    model, path = tiny_open_clip
    pickled = tmp_path / "open_clip_pytorch_model.bin"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, pickled)
    a = FrozenTextEncoder.from_open_clip("tiny", path, model_config=TINY_OPEN_CLIP)
    b = FrozenTextEncoder.from_open_clip("tiny", pickled, model_config=TINY_OPEN_CLIP)
    torch.testing.assert_close(b("a red circle"), a("a red circle"), rtol=0, atol=0)


def test_open_clip_saves_as_a_diffusers_text_encoder(tiny_open_clip, tmp_path):
    encoder = FrozenTextEncoder.from_open_clip(
        "tiny", tiny_open_clip[1], model_config=TINY_OPEN_CLIP
    )
    converted = open_clip_to_transformers(encoder.model)
    assert converted.config.num_hidden_layers == 2 and converted.config.hidden_act == "gelu"
    encoder.save_pretrained(tmp_path)
    reloaded = FrozenTextEncoder.from_pretrained(tmp_path)
    assert reloaded.kind == "transformers" and reloaded.tokenizer.pad_token_id == 0
    prompts = ["a red circle", "", "A Photo of a CAT!!!"]
    assert reloaded.tokenize(prompts).tolist() == encoder.tokenize(prompts).tolist()
    torch.testing.assert_close(reloaded(prompts), encoder(prompts), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------- bad input


def test_missing_folders_are_named(tiny_clip_folder, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        FrozenTextEncoder.from_pretrained(missing)
    (tmp_path / "half" / "text_encoder").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"has no tokenizer/"):
        FrozenTextEncoder.from_pretrained(tmp_path / "half")


def test_bad_open_clip_input_is_explained(tiny_open_clip, tmp_path):
    with pytest.raises(ValueError, match="unknown open_clip model 'no-such-clip'"):
        FrozenTextEncoder.from_open_clip("no-such-clip", tiny_open_clip[1])
    with pytest.raises(FileNotFoundError, match=r"nothing\.safetensors"):
        FrozenTextEncoder.from_open_clip(
            "tiny", tmp_path / "nothing.safetensors", model_config=TINY_OPEN_CLIP
        )
    deeper = copy.deepcopy(TINY_OPEN_CLIP)
    deeper["text_cfg"]["layers"] = 4
    with pytest.raises(ValueError, match=r"\(12 problems\): missing transformer\.resblocks\.3\."):
        FrozenTextEncoder.from_open_clip("tiny", tiny_open_clip[1], model_config=deeper)
    with pytest.raises(
        ValueError, match=r"token_embedding\.weight \(49408, 32\) != \(49408, 1024\)"
    ):
        FrozenTextEncoder.from_open_clip("ViT-H-14", tiny_open_clip[1])  # the built-in config


def test_unknown_kind_is_refused(tiny_clip_folder):
    encoder = FrozenTextEncoder.from_pretrained(tiny_clip_folder[0])
    with pytest.raises(ValueError, match=r"'onnx'.*transformers, open_clip"):
        FrozenTextEncoder(encoder.model, encoder.tokenizer, kind="onnx")
