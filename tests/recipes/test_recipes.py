"""``lightning_winoprune.recipes.load``: the recipes' callbacks for a LightningModule of one's own."""

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_winoprune.recipes as recipes
from lightning_winoprune import DEPrune, LatencyValidation, WinogradPruning
from lightning_winoprune.recipes import PrunedCheckpoint, Recipe, list_recipes, load
from lightning_winoprune.recipes._recipes import CONFIG_DIR


def test_load_gives_the_instantiated_callbacks_and_plain_settings():
    recipe = load("resnet18_abwsp")
    assert isinstance(recipe, Recipe) and recipe.name == "resnet18_abwsp"
    assert recipe.path == CONFIG_DIR / "resnet18_abwsp.yaml"
    pruner = recipe.pruning
    assert isinstance(pruner, WinogradPruning) and recipe.callbacks[0] is pruner
    assert (pruner.method, pruner.amount, pruner.m, pruner.schedule.start_epoch) == ("abwsp", 0.7, 2, 6)
    ckpt, latency = recipe.callbacks[1:]
    assert isinstance(ckpt, PrunedCheckpoint) and isinstance(ckpt, ModelCheckpoint)
    assert isinstance(latency, LatencyValidation) and (latency.batch_size, latency.input_size) == (1, 224)
    assert ckpt.monitor == "val/acc" and ckpt.mode == "max"
    assert recipe.trainer_kwargs["max_epochs"] == 10 and "callbacks" not in recipe.trainer_kwargs
    assert "logger" not in recipe.trainer_kwargs
    assert recipe.logger is not None and recipe.logger["class_path"].endswith("WandbLogger")
    assert recipe.model["model_name"] == "resnet18" and recipe.model["lr_milestones"] == [6, 8]
    assert recipe.data["class_path"] == "lightning_winoprune.data.DigitsDataModule"


def test_load_deprune_recipe_and_overrides():
    recipe = load("mobilenetv3_large_100_deprune_bh.yaml", start_epoch=0, dw_amount=0.3)
    pruner = recipe.pruning
    assert isinstance(pruner, DEPrune)
    assert (pruner.method, pruner.dw_amount, pruner.pw_amount, pruner.schedule.start_epoch) == ("dcp-bh", 0.3, 0.3, 0)
    assert load("mobilenetv3_large_100_deprune_bh").pruning.schedule.start_epoch == 6  # the file is unchanged


def test_load_accepts_a_yaml_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text((CONFIG_DIR / "vgg16_wspc.yaml").read_text().replace("amount: 0.7", "amount: 0.4"))
    recipe = load(path)
    assert recipe.name == "mine" and recipe.pruning.method == "wsp-c" and recipe.pruning.amount == 0.4


def test_load_rejects_unknown_names_and_bad_overrides(tmp_path):
    with pytest.raises(ValueError, match="unknown recipe 'resnet18_magic'") as err:
        load("resnet18_magic")
    assert all(name in str(err.value) for name in list_recipes())
    with pytest.raises(ValueError, match=r"WinogradPruning takes no argument 'amonut'; valid arguments are \['method'"):
        load("resnet18_abwsp", amonut=0.5)
    with pytest.raises(ValueError, match=r"recipe 'resnet18_abwsp' .*amount must be a number in \[0, 1\), got 1.5"):
        load("resnet18_abwsp", amount=1.5)
    (tmp_path / "bad.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="not a recipe"):
        load(tmp_path / "bad.yaml")


@pytest.mark.parametrize("name", list_recipes())
def test_every_recipe_loads(name):
    recipe = load(name)
    assert isinstance(recipe.pruning, DEPrune if "deprune" in name else WinogradPruning)
    steps = recipe.pruning.schedule.steps()
    first, last = steps[0][0], steps[-1][0]
    # a dense warm-up before the prune point, fine-tuning after it, and the LR steps down at the (last) prune point:
    # spatial-Winograd's spatial epoch between its two stages trains at the dense LR
    assert 0 < first <= last < recipe.trainer_kwargs["max_epochs"] - 1
    assert recipe.model["lr_milestones"][0] == last and recipe.model["pretrained"] is False
    assert recipe.model["momentum"] == 0.9 and recipe.model["weight_decay"] == 1e-4
    assert recipe.logger is not None and recipe.logger["init_args"]["name"] == name


def test_public_api():
    assert {"Recipe", "list_recipes", "load", "ImageClassifier", "PrunedCheckpoint"} <= set(recipes.__all__)
    assert set(recipes.__all__) <= set(dir(recipes))
