from pathlib import Path

import pytest

from genderrec.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_shipped_configs_validate(monkeypatch):
    monkeypatch.delenv("CELEBA_DIR", raising=False)
    for path in sorted((REPO / "configs").glob("*.yaml")):
        if path.name in ("serve.yaml", "label.yaml"):
            continue  # not training configs: validated by the serving and labeling tests
        cfg = load_config(path)
        assert cfg.data.celeba_dir or cfg.data.manifest, path


def test_misspelled_key_is_an_error_naming_file_and_key(tmp_path):
    path = write(tmp_path, "data: {manifest: m.parquet}\ntraining: {learning_rat: 0.1}\n")
    with pytest.raises(ConfigError, match=r"config\.yaml: training\.learning_rat: Extra inputs are not permitted"):
        load_config(path)


def test_unknown_section_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="trainng"):
        load_config(write(tmp_path, "data: {manifest: m.parquet}\ntrainng: {epochs: 1}\n"))


def test_environment_expansion_with_default(tmp_path, monkeypatch):
    path = write(tmp_path, "data: {celeba_dir: '${MY_CELEBA:-/data/celeba}'}\n")
    monkeypatch.delenv("MY_CELEBA", raising=False)
    assert load_config(path).data.celeba_dir == "/data/celeba"
    monkeypatch.setenv("MY_CELEBA", "s3://bucket/celeba")
    assert load_config(path).data.celeba_dir == "s3://bucket/celeba"


def test_missing_environment_variable_without_default(tmp_path, monkeypatch):
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    with pytest.raises(ConfigError, match="NOT_SET_ANYWHERE"):
        load_config(write(tmp_path, "data: {celeba_dir: '${NOT_SET_ANYWHERE}'}\n"))


def test_overrides_are_parsed_as_yaml_and_validated(tmp_path):
    path = write(tmp_path, "data: {manifest: m.parquet}\n")
    cfg = load_config(path, ["training.epochs=3", "models.architectures=[resnet50]", "data.image_size=[64, 52]"])
    assert cfg.training.epochs == 3
    assert cfg.models.architectures == ("resnet50",)
    assert cfg.data.image_size == (64, 52)
    with pytest.raises(ConfigError, match="training.epochs"):
        load_config(path, ["training.epochs=zero"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(path, ["training.epochs"])


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"data": {}}, "celeba_dir"),
        ({"data": {"manifest": "m", "fractions": [0.5, 0.5, 0.5]}}, "sum to 1"),
        ({"data": {"manifest": "m", "image_size": [16, 16]}}, "at least 32"),
        ({"data": {"manifest": "m"}, "models": {"architectures": ["alexnet"]}}, "alexnet"),
        ({"data": {"manifest": "m"}, "models": {"weights": "imagenet"}}, "googlenet has no official"),
        ({"data": {"manifest": "m"}, "selection": {"pin": "resnet50"}}, "resnet50/fine_tune"),
        ({"data": {"manifest": "m"}, "training": {"precision": "float16"}}, "training.precision"),
        ({"data": {"manifest": "m"}, "training": {"learning_rate": {"vgg17": 1e-4}}}, "unknown runs"),
        ({"data": {"manifest": "m"}, "models": {"weights": {"vgg16/transfer": "none"}}}, "unknown architectures"),
        ({"data": {"manifest": "m"}, "training": {"learning_rate": {"vgg16": 0}}}, "must be > 0"),
        (
            {
                "data": {"manifest": "m"},
                "models": {"architectures": ["vgg16"]},
                "selection": {"pin": "resnet50/transfer"},
            },
            "not among the configured runs",
        ),
    ],
)
def test_invalid_values(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


def test_weights_per_architecture():
    cfg = parse_config({"data": {"manifest": "m"}, "models": {"weights": {"default": "none", "vgg16": "s3://w/v.h5"}}})
    assert cfg.models.weights_for("vgg16") == "s3://w/v.h5"
    assert cfg.models.weights_for("resnet50") == "none"
    default = parse_config({"data": {"manifest": "m"}})
    assert default.models.weights_for("resnet50") == "imagenet"
    assert default.models.weights_for("googlenet") == "none"


def test_learning_rate_per_architecture_reaches_the_optimizer():
    import keras

    from genderrec import training

    rates = {"default": 1e-3, "vgg16": 1e-4, "vgg16/transfer": 5e-4}
    cfg = parse_config({"data": {"manifest": "m"}, "training": {"learning_rate": rates}})
    assert parse_config({"data": {"manifest": "m"}}).training.learning_rate_for("vgg16") == 1e-4  # the notebook's
    for architecture, mode, expected in (
        ("vgg16", "fine_tune", 1e-4),
        ("vgg16", "transfer", 5e-4),
        ("resnet50", "transfer", 1e-3),
    ):
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, activation="sigmoid")])
        training.compile_model(model, cfg, steps_per_epoch=1, architecture=architecture, mode=mode)
        assert float(model.optimizer.learning_rate) == pytest.approx(expected)


def test_attribute_pretraining_stops_on_validation_loss():
    from genderrec import training

    cfg = parse_config(
        {"data": {"manifest": "m"}, "models": {"pretrain_epochs": 6}, "training": {"epochs": 4, "early_stopping": {}}}
    )
    recipe = training.pretraining_config(cfg, "vgg16").training
    assert (recipe.epochs, recipe.early_stopping.monitor, recipe.early_stopping.patience) == (6, "val_loss", 5)
    assert cfg.training.early_stopping.monitor == "val_accuracy"  # the runs keep theirs


def test_attribute_pretraining_epochs_per_architecture():
    from genderrec import training

    cfg = parse_config({"data": {"manifest": "m"}, "models": {"pretrain_epochs": {"default": 4, "googlenet": 8}}})
    epochs = {name: training.pretraining_config(cfg, name).training.epochs for name in ("vgg16", "googlenet")}
    assert epochs == {"vgg16": 4, "googlenet": 8}
    assert training.pretraining_config(parse_config({"data": {"manifest": "m"}}), "vgg16").training.epochs == 25
    for wrong in ({"googlenet": 0}, {"alexnet": 3}, 0):
        with pytest.raises(ConfigError, match="pretrain_epochs"):
            parse_config({"data": {"manifest": "m"}, "models": {"pretrain_epochs": wrong}})


def test_attribute_pretraining_augments_only_when_asked():
    from genderrec import images, training

    base = {"data": {"manifest": "m"}, "augment": {"rotation_degrees": 10, "shift": 0.1, "zoom": 0.1}}
    cfg = parse_config(base)
    assert images.augmentation(**training.pretraining_config(cfg, "vgg16").augment.model_dump()) is None
    assert (
        training.pretraining_config(cfg, "vgg16").augment.shift == 0 and cfg.augment.shift == 0.1
    )  # the runs keep theirs
    asked = parse_config({**base, "models": {"pretrain_augment": True}})
    assert training.pretraining_config(asked, "vgg16").augment == asked.augment


def test_data_cache_modes_and_the_old_booleans():
    assert parse_config({"data": {"manifest": "m"}}).data.cache == "auto"
    assert parse_config({"data": {"manifest": "m", "cache": True}}).data.cache == "auto"
    assert parse_config({"data": {"manifest": "m", "cache": False}}).data.cache == "none"
    assert parse_config({"data": {"manifest": "m", "cache": "memory"}}).data.cache == "memory"
    with pytest.raises(ConfigError, match="data.cache"):
        parse_config({"data": {"manifest": "m", "cache": "disk"}})
    with pytest.raises(ConfigError, match="data.cache_budget_fraction"):
        parse_config({"data": {"manifest": "m", "cache_budget_fraction": 1.5}})


def test_attribute_pretraining_and_auxiliary_heads_are_config_keys():
    cfg = parse_config(
        {
            "data": {"manifest": "m"},
            "models": {"weights": {"default": "attributes", "vgg16": "none"}, "aux_attributes": ["Smiling"]},
        }
    )
    assert cfg.models.weights_for("googlenet") == "attributes" and cfg.models.weights_for("vgg16") == "none"
    assert (
        cfg.models.aux_attributes == ("Smiling",) and cfg.models.aux_loss_weight == 0.5 and cfg.models.uses_attributes()
    )
    assert parse_config({"data": {"manifest": "m"}, "models": {"aux_attributes": "all"}}).models.aux_attributes == "all"
    assert not parse_config({"data": {"manifest": "m"}, "models": {"weights": "none"}}).models.uses_attributes()
    with pytest.raises(ConfigError, match="aux_loss_weight"):
        parse_config({"data": {"manifest": "m"}, "models": {"aux_loss_weight": 0}})


def test_training_seed_defaults_to_the_split_seed_and_can_differ_from_it():
    cfg = parse_config({"data": {"manifest": "m.parquet", "seed": 7}})
    assert cfg.training_seed == 7
    rerun = parse_config({"data": {"manifest": "m.parquet", "seed": 7}, "training": {"seed": 8}})
    assert (rerun.data.seed, rerun.training_seed) == (7, 8)
