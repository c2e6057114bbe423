"""Textual-inversion embeddings against diffusers' `load_textual_inversion` on tiny components:
diffusers and A1111 files, multi-vector tokens, both text-encoder kinds, saving, and bad files."""

import numpy as np
import open_clip
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import save_file

from ldm.config import DEFAULT_MODEL
from ldm.encoders.placeholders import add_token, token_embedding, token_ids, token_vectors
from ldm.encoders.text import FrozenTextEncoder
from ldm.encoders.tokenizer import OPEN_CLIP_PAD_TOKEN, build_clip_tokenizer
from ldm.formats.textual_inversion import read_embedding, save_a1111_embedding, save_embedding
from ldm.pipeline import LatentDiffusionPipeline

TOKEN = "<my-icon>"
PROMPT = f"a {TOKEN} on a blue background"
ONE_LEVEL = 1 / 255 + 1e-6
WIDTH = 32  # the tiny text encoder's


def latents():
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))


def theirs(pipe, prompt=PROMPT):
    return pipe(prompt, latents=latents(), num_inference_steps=4, output_type="np").images


def ours(pipe, prompt=PROMPT):
    kwargs = dict(num_inference_steps=4, sampler="ddim", output_type="np", progress=False)
    return pipe(prompt, latents=latents(), **kwargs).images


def diffusers_pipe(sd_dir):
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def vectors(n, seed=1, width=WIDTH):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def a1111_pt(path, name, vecs):
    """An A1111 ``.pt`` embedding, as its `Embedding.save` writes one."""
    data = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": vecs.clone().requires_grad_(True)},
        "name": name,
        "step": 500,
        "sd_checkpoint": "a1b2c3d4",
        "sd_checkpoint_name": "v1-5-pruned",
    }
    torch.save(data, path)
    return path


@pytest.fixture(scope="module")
def without(tiny_sd_dir):
    """Our image for the prompt with no embedding loaded (the token is then read as text)."""
    return ours(LatentDiffusionPipeline.from_pretrained(tiny_sd_dir))


@pytest.mark.parametrize("layout", ["diffusers", "diffusers-bin", "a1111-pt", "a1111-safetensors"])
def test_an_embedding_gives_diffusers_images(tiny_sd_dir, without, tmp_path, layout):
    reference = diffusers_pipe(tiny_sd_dir)
    if layout == "diffusers":  # 3 vectors: <my-icon>, <my-icon>_1, <my-icon>_2
        path = tmp_path / "learned_embeds.safetensors"
        save_embedding(path, TOKEN, vectors(3))
        reference.load_textual_inversion(str(path))
    elif layout == "diffusers-bin":  # one vector of shape (D,)
        path = tmp_path / "learned_embeds.bin"
        torch.save({TOKEN: vectors(1)[0]}, path)
        reference.load_textual_inversion(str(path))
    elif layout == "a1111-pt":  # named after the file in A1111; diffusers reads "name"
        path = a1111_pt(tmp_path / f"{TOKEN}.pt", TOKEN, vectors(2))
        reference.load_textual_inversion(str(path))
    else:
        path = tmp_path / f"{TOKEN}.safetensors"
        save_a1111_embedding(path, TOKEN, vectors(4), step=100)
        reference.load_textual_inversion(str(path), token=TOKEN)  # else its token: emb_params
    pipe = LatentDiffusionPipeline.from_pretrained(tiny_sd_dir)
    assert pipe.load_textual_inversion(path) == TOKEN
    after = ours(pipe)
    assert np.abs(after - without).max() > 20 / 255  # the embedding changes the image
    np.testing.assert_allclose(after, theirs(reference), rtol=0, atol=ONE_LEVEL)


def test_the_token_reads_its_vectors_in_every_tokenizing_path(tiny_sd_dir, tmp_path):
    pipe = LatentDiffusionPipeline.from_pretrained(tiny_sd_dir)
    encoder = pipe.text_encoder
    red_circle = encoder.tokenize("red circle")[0, 1:3]  # the ids of "red", "circle"
    rows = token_embedding(encoder).weight[red_circle].clone()  # (2, D)
    before = token_embedding(encoder).weight.clone()
    ids = add_token(encoder, TOKEN, rows)
    assert ids == token_ids(encoder, TOKEN) and len(ids) == 2
    weight = token_embedding(encoder).weight
    assert not any(p.requires_grad for p in encoder.parameters())  # still frozen
    torch.testing.assert_close(weight[: len(before)], before, rtol=0, atol=0)  # no row changed
    torch.testing.assert_close(token_vectors(encoder, TOKEN), rows, rtol=0, atol=0)
    assert pipe.textual_inversion_tokens == {TOKEN: 2}
    # the token stands for the words its vectors copy, in any case, glued to punctuation
    torch.testing.assert_close(encoder("a <My-Icon>, x"), encoder("a red circle, x"))
    assert encoder.tokenize(f"a {TOKEN}")[0, :5].tolist() == [49406, 320, *ids, 49407]
    assert encoder.count_tokens([f"a {TOKEN}", "a"]) == [5, 3]
    save_embedding(tmp_path / "e.safetensors", TOKEN, token_vectors(encoder, TOKEN))
    assert torch.equal(read_embedding(tmp_path / "e.safetensors")[1], rows)


def test_the_shipped_model_and_an_open_clip_tower_take_tokens_too():
    # the shipped model's pruned vocabulary; an open_clip tower, which pads with "!" (id 0)
    shipped = FrozenTextEncoder.from_pretrained(DEFAULT_MODEL)
    tower = open_clip.model._build_text_tower(16, {"width": 32, "heads": 4, "layers": 2})
    tokenizer = build_clip_tokenizer(pad_token=OPEN_CLIP_PAD_TOKEN)
    for encoder in (shipped, FrozenTextEncoder(tower, tokenizer, kind="open_clip")):
        rows = len(token_embedding(encoder).weight)
        red = encoder.tokenize("red")[0, 1]
        (new_id,) = add_token(encoder, "<my-red>", token_embedding(encoder).weight[red])
        assert new_id == rows == len(token_embedding(encoder).weight) - 1  # grown by one row
        torch.testing.assert_close(encoder("a <my-red> circle!!!"), encoder("a red circle!!!"))


def test_saved_pipelines_keep_the_embedding(tiny_sd_dir, tmp_path):
    path = tmp_path / "learned_embeds.safetensors"
    save_embedding(path, TOKEN, vectors(3, seed=2))
    pipe = LatentDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.load_textual_inversion(path)
    expected = ours(pipe)
    pipe.save_pretrained(tmp_path / "saved")
    reloaded = LatentDiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert reloaded.textual_inversion_tokens == {TOKEN: 3}
    np.testing.assert_array_equal(ours(reloaded), expected)
    np.testing.assert_allclose(
        theirs(diffusers_pipe(tmp_path / "saved")), expected, rtol=0, atol=ONE_LEVEL
    )
    pipe.save_single_file(tmp_path / "model.safetensors")
    single = LatentDiffusionPipeline.from_single_file(tmp_path / "model.safetensors")
    torch.testing.assert_close(single.text_encoder(PROMPT), pipe.text_encoder(PROMPT))


def test_files_round_trip(tmp_path):
    vecs = vectors(3)
    save_embedding(tmp_path / "a.safetensors", TOKEN, vecs)
    token, read = read_embedding(tmp_path / "a.safetensors")
    assert token == TOKEN and torch.equal(read, vecs)
    assert read_embedding(tmp_path / "a.safetensors", token="<other>")[0] == "<other>"
    save_a1111_embedding(tmp_path / "style.safetensors", "style", vecs, step=7)
    with safe_open(str(tmp_path / "style.safetensors"), "pt") as f:
        assert list(f.keys()) == ["emb_params"] and f.metadata()["step"] == "7"
    token, read = read_embedding(tmp_path / "style.safetensors")
    assert token == "style" and torch.equal(read, vecs)  # named after the file, as in A1111
    token, read = read_embedding(a1111_pt(tmp_path / "old-name.pt", "inside", vecs[:1]))
    assert token == "old-name" and torch.equal(read, vecs[:1])
    # A1111 files from torch 1.11 hold a ParameterDict
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vecs)})
    torch.save({"string_to_param": params, "name": "x"}, tmp_path / "dict.pt")
    assert torch.equal(read_embedding(tmp_path / "dict.pt")[1], vecs)
    with pytest.raises(ValueError, match=r"as \.safetensors only"):
        save_embedding(tmp_path / "a.bin", TOKEN, vecs)


class NotATensor:
    pass


def test_bad_files_are_refused_with_the_file_and_the_reason(tiny_sd_dir, tmp_path):
    pipe = LatentDiffusionPipeline.from_pretrained(tiny_sd_dir)
    save_embedding(tmp_path / "good.safetensors", TOKEN, vectors(2))
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 8])
    a1111_pt(tmp_path / "whole.pt", "x", vectors(2))
    data = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    save_file({"a": vectors(1), "b": vectors(1)}, tmp_path / "keys.safetensors")
    save_file({"clip_l": vectors(1), "clip_g": vectors(1)}, tmp_path / "sdxl.safetensors")
    save_embedding(tmp_path / "wide.safetensors", "<wide>", vectors(2, width=768))
    save_embedding(tmp_path / "word.safetensors", "circle", vectors(1))
    save_embedding(tmp_path / "spaced.safetensors", "my style", vectors(1))
    torch.save({"<x>": NotATensor()}, tmp_path / "code.pt")
    cases = {
        "cut.safetensors": "is truncated",
        "cut.pt": "is not a whole PyTorch file",
        "keys.safetensors": "is not an embedding file: its 2 keys are a, b;",
        "sdxl.safetensors": "is an SDXL embedding",
        "wide.safetensors": "are 768 wide but this text encoder's tokens are 32 wide",
        "word.safetensors": "token 'circle' is already in the tokenizer's vocabulary",
        "spaced.safetensors": "one word without spaces",
        "code.pt": "pickled Python objects other than tensors .*NotATensor.*not read",
    }
    for name, message in cases.items():
        with pytest.raises(ValueError, match=message) as error:
            pipe.load_textual_inversion(tmp_path / name)
        assert str(error.value).startswith(str(tmp_path / name)), name
        assert "\n" not in str(error.value), name
    pipe.load_textual_inversion(tmp_path / "good.safetensors")
    vocab = len(pipe.text_encoder.tokenizer)
    with pytest.raises(ValueError, match=r"good\.safetensors: token '<my-icon>' is already"):
        pipe.load_textual_inversion(tmp_path / "good.safetensors")
    with pytest.raises(ValueError, match="would read as a vector of the embedding '<my-icon>'"):
        pipe.load_textual_inversion(tmp_path / "good.safetensors", token=f"{TOKEN}_7")
    with pytest.raises(FileNotFoundError, match="no embedding file at"):
        pipe.load_textual_inversion(tmp_path / "missing.safetensors")
    assert len(pipe.text_encoder.tokenizer) == vocab  # nothing was added on the way
    assert len(token_embedding(pipe.text_encoder).weight) == vocab
    assert pipe.textual_inversion_tokens == {TOKEN: 2}
