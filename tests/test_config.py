"""Typed configs: YAML in, dotted overrides, unknown keys refused by name."""

from pathlib import Path

import pytest

from ldm.config import DEFAULT_MODEL, DataConfig, TrainConfig, TrainSettings, VAETrainConfig

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "finetune.yaml"


def test_the_shipped_recipe_loads_with_overrides():
    config = TrainConfig.from_yaml(
        RECIPE, ["train.max_steps=200", "data.resolution=32", "validation.seeds=[5, 6]"]
    )
    assert config.model == "path/to/model" and config.data == DataConfig(
        "path/to/images", resolution=32
    )
    assert config.train.max_steps == 200 and config.train.learning_rate == 1e-4
    assert config.train.lr_scheduler == "cosine" and config.train.min_snr_gamma == 5.0
    assert config.validation.seeds == [5, 6]
    assert TrainConfig.from_dict(config.to_dict()) == config  # saved with checkpoints, read back


def test_model_default_names_the_shipped_model():
    config = TrainConfig.from_dict({"model": "default", "data": {"path": "d"}})
    assert config.model == str(DEFAULT_MODEL)
    assert TrainConfig.from_dict({"model": "my/model", "data": {"path": "d"}}).model == "my/model"


def test_defaults_fill_what_the_yaml_leaves_out(tmp_path):
    (tmp_path / "c.yaml").write_text("model: m\ndata:\n  path: d\n")
    config = TrainConfig.from_yaml(tmp_path / "c.yaml")
    assert config.train == TrainSettings() and config.train.caption_dropout == 0.1
    assert config.data.caption_column == "text" and config.output_dir == "runs/train"


@pytest.mark.parametrize(
    ("yaml_text", "overrides", "message"),
    [
        (
            "model: m\ndata: {path: d}\nlearning_rate: 1\n",
            [],
            "unknown key learning_rate; allowed: data, model",
        ),
        (
            "model: m\ndata: {path: d}\n",
            ["train.lr=1"],
            r"unknown key train\.lr; allowed in train: max_steps",
        ),
        ("model: m\ndata: {path: d, resolutoin: 64}\n", [], r"unknown key data\.resolutoin"),
        ("model: m\n", [], "missing required key data"),
        ("model: m\ndata: {}\n", [], r"missing required key data\.path"),
        ("data: {path: d}\n", [], "say what to train: model: a pipeline folder"),
        (
            "model: m\ndata: {path: d}\n",
            ["train.mixed_precision=fp8"],
            r"train\.mixed_precision='fp8' is not allowed; use no, fp16, bf16",
        ),
        (
            "model: m\ndata: {path: d}\n",
            ["train.caption_dropout=1.5"],
            r"caption_dropout=1\.5 is not allowed; use a number in \[0, 1\]",
        ),
        ("model: m\ndata: {path: d}\n", ["train.max_steps"], "is not KEY=VALUE"),
        (
            "model: m\ndata: {path: d, resolution: 0}\n",
            [],
            "resolution must be a positive int, got 0",
        ),
        (
            "model: m\ndata: {path: d}\n",
            ["train.max_steps=abc"],
            r"train\.max_steps='abc' is not allowed; use an integer",
        ),
    ],
)
def test_bad_configs_are_errors_that_name_the_key(tmp_path, yaml_text, overrides, message):
    (tmp_path / "c.yaml").write_text(yaml_text)
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_yaml(tmp_path / "c.yaml", overrides)


def test_numbers_that_yaml_reads_as_strings_become_numbers(tmp_path):
    # YAML 1.1 reads 1e-05 (no dot, as json.dumps writes it) as a string
    (tmp_path / "c.yaml").write_text('{"data": "d", "kl_weight": 1e-05, "max_steps": "30"}')
    config = VAETrainConfig.from_yaml(tmp_path / "c.yaml")
    assert config.kl_weight == 1e-05 and config.max_steps == 30
    settings = TrainConfig.from_yaml(RECIPE, ["train.learning_rate=3e-4"]).train
    assert settings.learning_rate == 3e-4


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config file at"):
        TrainConfig.from_yaml(tmp_path / "nope.yaml")
