"""The ``winoprune`` CLI: every recipe runs a smoke fit, overrides apply, W&B gets the run, the summary is right."""

import glob
import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from rich.table import Table

from lightning_winoprune import DEPrune, LatencyValidation, WinogradPruning, load_deployed, load_pruned_checkpoint
from lightning_winoprune.recipes import ImageClassifier, PrunedCheckpoint, list_recipes
from lightning_winoprune.recipes._cli import WinopruneCLI, _resolve_config_names, main, run_cli
from lightning_winoprune.recipes._errors import CLIError
from lightning_winoprune.recipes._recipes import CONFIG_DIR
from lightning_winoprune.recipes._wandb import configure_wandb_mode

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("wandb_helpers", ROOT / "tests" / "callbacks" / "wandb_helpers.py")
assert _spec is not None and _spec.loader is not None
wandb_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wandb_helpers)

RECIPES = ["efficientnet_b0_deprune_bh", "mobilenetv2_100_deprune_bh", "mobilenetv3_large_100_deprune_bh",
           "resnet18_abwsp", "resnet18_spatial_winograd", "resnet18_wspr", "resnet50_abwsp", "resnet50_wspr",
           "vgg16_wspc", "vgg16_wspr"]
#: Extra smoke arguments per recipe: spatial-Winograd runs both stages at the smoke run's one pruning epoch.
SMOKE_EXTRA = {"resnet18_spatial_winograd": ["--pruning.spatial_epochs", "0"]}


def smoke_args(tmp_path: Path, image_size: int = 16) -> list[str]:
    """Two epochs of two batches: epoch 0 dense, pruning at the start of epoch 1; everything written to tmp_path."""
    return ["--trainer.max_epochs", "2", "--pruning.start_epoch", "1", "--model.lr_milestones", "[1]",
            "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches",
            "1", "--data.image_size", str(image_size), "--data.batch_size", "8", "--pruning.calibration_batches", "1",
            "--pruning.verbose", "0", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary",
            "false", "--trainer.default_root_dir", str(tmp_path), "--latency.input_size", str(image_size),
            "--latency.repeats", "1", "--latency.warmup", "0"]


def test_the_bundled_recipes_are_the_documented_ones_and_reachable_from_the_repo_root():
    assert list_recipes() == RECIPES
    for name in RECIPES:
        assert (ROOT / "recipes" / f"{name}.yaml").read_bytes() == (CONFIG_DIR / f"{name}.yaml").read_bytes()


def test_console_script_is_registered():
    (ep,) = importlib.metadata.entry_points(group="console_scripts", name="winoprune")
    assert ep.value == "lightning_winoprune.recipes._cli:main"
    assert ep.load() is main


# ------------------------------------------------------------------------------------------ every recipe, smoke
def check_smoke_run(cli, name: str) -> None:
    """What every recipe's smoke fit must show: a dense epoch, one pruning step, a pruned best checkpoint, a summary."""
    assert isinstance(cli, WinopruneCLI)
    pruner = next(cb for cb in cli.trainer.callbacks if isinstance(cb, (WinogradPruning, DEPrune)))
    assert isinstance(pruner, DEPrune if "deprune" in name else WinogradPruning)
    assert [h["epoch"] for h in pruner.history] == [1]
    summary = cli.fit_summary
    assert summary is not None and summary["recipe"] == name
    assert summary["prune_epochs"] == [1, 1]
    assert summary["dense_val_epoch"] == 0 and 0 <= summary["dense_val_acc"] <= 1
    assert 0 <= summary["test_acc"] <= 1 and summary["tested"] == "best checkpoint"
    key = "DEPrune dw_sparsity" if "deprune" in name else "WinogradPruning sparsity"
    assert summary["sparsity"][key] > 0.4
    # the best checkpoint is a pruned one: the dense epoch 0 is never a candidate
    ckpt = next(cb for cb in cli.trainer.callbacks if isinstance(cb, PrunedCheckpoint))
    assert Path(summary["best_checkpoint"]).is_file() and "epoch=1" in summary["best_checkpoint"]
    assert ckpt.best_model_path == summary["best_checkpoint"]
    # num_classes and in_chans came from the datamodule
    assert cli.model.hparams["num_classes"] == 10 and cli.model.hparams["in_chans"] == 1
    # the latency validation ran on the pruned layers, verified them, and its report reached the summary
    latency = next(cb for cb in cli.trainer.callbacks if isinstance(cb, LatencyValidation))
    assert latency.report is not None and latency.report.layers
    assert all(row.max_error < 1e-3 for row in latency.report.layers)
    assert any(entry["json_path"] == str(latency.report.json_path) for entry in summary["reports"])
    # the deployed best model was saved beside the best checkpoint, and the summary names it
    assert latency.deployed_path is not None and latency.deployed_path.is_file()
    assert latency.deployed_path == Path(summary["best_checkpoint"]).with_suffix(".pt2")
    assert any(entry["deployed_path"] == str(latency.deployed_path) for entry in summary["reports"])


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """``winoprune fit`` of a recipe in its smoke configuration without a logger, run once per module."""
    runs: dict = {}

    def run(name: str):
        if name not in runs:
            out = tmp_path_factory.mktemp(name)
            size = 32 if name.startswith("vgg16") else 16  # five 2x2 max-pools need 32
            path = ROOT / "recipes" / f"{name}.yaml"  # the README's form, through the repository's symlink
            config = str(path) if path.is_file() else name
            runs[name] = run_cli(["fit", "--config", config, "--trainer.logger", "false", *smoke_args(out, size),
                                  *SMOKE_EXTRA.get(name, [])])
        return runs[name]

    return run


# resnet18_abwsp's smoke run is the W&B test below
@pytest.mark.parametrize("name", [n for n in RECIPES if n != "resnet18_abwsp"])
def test_every_recipe_runs_a_smoke_fit(name, smoke_runs, quiet_single_thread):
    check_smoke_run(smoke_runs(name), name)


def test_a_recipe_trains_under_bf16_mixed(tmp_path, quiet_single_thread):
    """``--trainer.precision bf16-mixed`` (CPU autocast to bfloat16) is the recipes' bfloat16 switch. 32x32: at 16x16
    resnet18's layer4.0.conv1 sees a 1x1 map, where torch 2.14's bfloat16 weight gradient is garbage."""
    cli = run_cli(["fit", "--config", "resnet18_wspr", "--trainer.logger", "false", *smoke_args(tmp_path, 32),
                   "--trainer.precision", "bf16-mixed"])
    assert cli.trainer.precision == "bf16-mixed"
    check_smoke_run(cli, "resnet18_wspr")
    layers = [m for m in cli.model.modules() if getattr(m, "mask", None) is not None]
    assert layers and all(torch.count_nonzero(m.weight.detach()[~m.mask]) == 0 for m in layers)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in cli.model.parameters())


def test_overrides_change_the_recipe_and_links_follow_the_data(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "")  # unset: left alone, since this run has no WandbLogger
    monkeypatch.setattr(sys, "argv", ["winoprune"])  # only the explicit arguments
    cli = WinopruneCLI(args=["--config", str(CONFIG_DIR / "resnet18_abwsp.yaml"), "--pruning.method", "wsp-c",
                             "--pruning.amount", "0.5", "--model.lr", "0.02", "--data.in_chans", "3",
                             "--trainer.max_epochs", "3", "--trainer.logger", "false",
                             "--trainer.default_root_dir", str(tmp_path)], run=False)
    pruner = next(cb for cb in cli.trainer.callbacks if isinstance(cb, WinogradPruning))
    assert (pruner.method, pruner.amount, pruner.schedule.start_epoch) == ("wsp-c", 0.5, 6)
    assert cli.model.hparams["lr"] == 0.02 and cli.trainer.max_epochs == 3
    assert cli.model.hparams["in_chans"] == 3 and cli.model.model.conv1.weight.shape[1] == 3
    assert cli.trainer.logger is None and os.environ["WANDB_MODE"] == ""


def test_config_accepts_a_bundled_recipe_name_and_rejects_bad_values(tmp_path):
    assert _resolve_config_names(["fit", "--config", "vgg16_wspc", "-c=resnet18_wspr"]) == [
        "fit", "--config", str(CONFIG_DIR / "vgg16_wspc.yaml"), f"-c={CONFIG_DIR / 'resnet18_wspr.yaml'}"]
    with pytest.raises(CLIError, match=r"--config 'x'.*vgg16_wspr"):
        _resolve_config_names(["fit", "-c=x"])
    assert _resolve_config_names(["fit", "--config=resnet50_wspr.yaml"]) == [
        "fit", f"--config={CONFIG_DIR / 'resnet50_wspr.yaml'}"]
    with pytest.raises(SystemExit):  # a typo in an argument name
        main(["fit", "--config", "resnet18_abwsp", "--pruning.amonut", "0.5"])
    with pytest.raises(SystemExit):
        main(["fit", "--config", "resnet18_abwsp", "--pruning.method", "nope", "--trainer.logger", "false",
              "--trainer.default_root_dir", str(tmp_path)])


# ------------------------------------------------------------------------------------------ short errors
RECIPE_ARGS = ["fit", "--config", "resnet18_abwsp", "--trainer.logger", "false", "--data.image_size", "16"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # before: a 60-77-line double jsonargparse traceback with the real message buried in the middle
        (["--pruning.amount", "2"], ["--pruning.amount", "amount must be a number in [0, 1), got 2.0"]),
        (["--pruning.method", "nope"], ["--pruning.method", "method='nope' is not valid",
                                        "['abwsp', 'bwsp', 'fp', 'spatial-winograd', 'wsp-c', 'wsp-r', 'wwp']"]),
        (["--data.image_size", "4"], ["--data.image_size", "image_size must be >= 8", "got 4"]),
        (["--pruning.m", "3"], ["--pruning.m", "m=3 is not valid; valid values are [2, 4, 6]"]),
        # before: 64-71 lines of usage before a one-line error
        (["--trainer.max_epochs", "abc"], ["--trainer.max_epochs", "abc", "expected int or None"]),
        (["--pruning.amonut", "0.5"], ["--pruning.amonut", "no option 'amonut'", "amount", "method"]),
        (["--data.batch_size", "x"], ["--data.batch_size", "'x'", "expected int"]),
        # a schedule that cannot complete: found in setup, still one short error
        (["--pruning.start_epoch", "20", "--trainer.max_epochs", "3", "--trainer.enable_progress_bar", "false",
          "--latency", "null"], ["start_epoch=20 is not before max_epochs=3", "nothing would be pruned"]),
    ],
)
def test_a_bad_value_prints_one_short_error_and_exits_2(args, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WINOPRUNE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as err:
        main([*RECIPE_ARGS, "--trainer.default_root_dir", str(tmp_path), *args])
    assert err.value.code == 2
    stderr = capsys.readouterr().err
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    error = next(ln for ln in lines if ln.startswith("error: "))
    assert all(text in error for text in expected), error
    assert len(lines) < 10 and "Traceback" not in stderr and "usage:" not in stderr, stderr
    assert "--debug" in stderr and "WINOPRUNE_DEBUG=1" in stderr


@pytest.mark.parametrize("value", ["nope", "recipes/nope.yaml", str(Path("no") / "such" / "file.yaml")])
def test_an_unknown_recipe_or_missing_config_lists_the_recipes(value, capsys):
    # before: "File does not exist" after 63 lines of usage, and no list of the recipes
    with pytest.raises(SystemExit) as err:
        main(["fit", "--config", value])
    assert err.value.code == 2
    stderr = capsys.readouterr().err
    assert len(stderr.splitlines()) < 10 and f"--config {value!r}" in stderr
    assert all(name in stderr for name in RECIPES), stderr


def test_debug_flag_or_environment_variable_shows_the_full_error(tmp_path, monkeypatch):
    args = [*RECIPE_ARGS, "--trainer.default_root_dir", str(tmp_path), "--pruning.amount", "2"]
    monkeypatch.delenv("WINOPRUNE_DEBUG", raising=False)
    with pytest.raises(Exception) as err:
        main([*args, "--debug"])
    assert not isinstance(err.value, SystemExit) and "amount must be a number" in repr(err.value.__cause__)
    monkeypatch.setenv("WINOPRUNE_DEBUG", "1")
    with pytest.raises(Exception) as err:
        main(args)
    assert not isinstance(err.value, SystemExit)


def test_the_readme_command_runs_from_any_directory(tmp_path, monkeypatch, capsys):
    # before: `winoprune fit --config recipes/resnet18_abwsp.yaml` worked only from the repository root
    monkeypatch.chdir(tmp_path)
    assert _resolve_config_names(["fit", "--config", "recipes/resnet18_abwsp.yaml"]) == [
        "fit", "--config", str(CONFIG_DIR / "resnet18_abwsp.yaml")]
    (tmp_path / "recipes").mkdir()  # a file of the user's own under that name wins
    (tmp_path / "recipes" / "resnet18_abwsp.yaml").write_text("trainer:\n  max_epochs: 1\n")
    assert _resolve_config_names(["fit", "-c", "recipes/resnet18_abwsp.yaml"]) == [
        "fit", "-c", "recipes/resnet18_abwsp.yaml"]
    (tmp_path / "recipes" / "resnet18_abwsp.yaml").unlink()
    with pytest.raises(SystemExit):  # the recipe was found: the error is about the value, not the file
        main(["fit", "--config", "recipes/resnet18_abwsp.yaml", "--pruning.amount", "2"])
    assert "--pruning.amount" in capsys.readouterr().err


def test_main_dispatches_extra_subcommands_from_one_table(monkeypatch):
    from lightning_winoprune.recipes import _cli

    seen = []
    monkeypatch.setitem(_cli.COMMANDS, "hello", lambda args: seen.append(args) or 3)
    with pytest.raises(SystemExit) as err:
        main(["hello", "a", "b"])
    assert err.value.code == 3 and seen == [["a", "b"]]


def test_summary_says_plainly_when_nothing_was_pruned():
    # before: "pruned val accuracy" and 0.0000 zero parameters, as if the model were pruned
    from rich.console import Console

    from lightning_winoprune.recipes._summary import print_summary

    summary = {"recipe": "resnet18_abwsp", "model": "resnet18", "epochs": 3, "prune_epochs": [6, 6],
               "dense_val_acc": None, "dense_val_epoch": None, "pruned_val_acc": 0.9, "best_pruned_val_acc": None,
               "test_acc": None, "tested": None, "sparsity": {}, "zero_parameters": 0.0, "fit_seconds": 1.0,
               "best_checkpoint": None, "last_checkpoint": None, "wandb_run_dir": None, "wandb_mode": None,
               "reports": []}
    console = Console(record=True, width=160)
    print_summary(type("T", (), {"callbacks": []})(), summary, console)
    out = console.export_text()
    assert "NOTHING WAS PRUNED" in out and "never reached" in out and "pruned val" not in out, out


def test_recipes_subcommand_lists_and_prints(capsys):
    assert run_cli(["recipes"]) is None
    out = capsys.readouterr().out
    assert all(name in out for name in RECIPES)
    main(["recipes", "vgg16_wspc"])
    assert capsys.readouterr().out == (CONFIG_DIR / "vgg16_wspc.yaml").read_text()
    with pytest.raises(SystemExit) as err:
        main(["recipes", "alexnet_magic"])
    assert err.value.code == 2
    assert "resnet18_abwsp" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ summary
class FakeReport:
    """What LatencyValidation leaves in ``report``: a rich renderable with a ``json_path``."""

    def __init__(self, path: Path) -> None:
        self.json_path = path

    def __rich__(self) -> Table:
        table = Table(title="fake latency report")
        table.add_row("layer1", "1.23 ms")
        return table


class Reporter(Callback):
    def __init__(self, path: Path) -> None:
        self.path, self.report = path, None

    def on_fit_end(self, trainer, pl_module):
        self.report = FakeReport(self.path)


def test_pretrained_style_run_measures_dense_accuracy_at_the_prune_point_and_prints_reports(tmp_path, capsys,
                                                                                          monkeypatch,
                                                                                          quiet_single_thread):
    monkeypatch.setattr(sys, "argv", ["winoprune"])
    args = ["fit", "--config", str(CONFIG_DIR / "mobilenetv2_100_deprune_bh.yaml"), "--trainer.logger", "false",
            *smoke_args(tmp_path), "--pruning.start_epoch", "0", "--trainer.max_epochs", "1", "--latency", "null"]
    cli = WinopruneCLI(args=args, trainer_defaults={"callbacks": [Reporter(tmp_path / "latency.json")]})
    summary = cli.fit_summary
    assert summary is not None and summary["prune_epochs"] == [0, 0]
    assert summary["dense_val_epoch"] is None and 0 <= summary["dense_val_acc"] <= 1  # measured before pruning
    assert summary["reports"] == [{"callback": "Reporter", "json_path": str(tmp_path / "latency.json"),
                                   "deployed_path": None}]
    out = capsys.readouterr().out
    assert "fake latency report" in out and "1.23 ms" in out
    assert "measured at the prune point" in out and "winoprune summary: mobilenetv2_100_deprune_bh" in out
    assert out.index("fake latency report") < out.index("winoprune summary")


def test_configure_wandb_mode(monkeypatch, tmp_path):
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert configure_wandb_mode() == "disabled"
    monkeypatch.setenv("WANDB_MODE", "")
    assert configure_wandb_mode() == "offline"
    assert os.environ["WANDB_MODE"] == "offline"
    monkeypatch.setenv("WANDB_MODE", "")
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "x" * 40 + "\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert configure_wandb_mode() == "online" and os.environ["WANDB_MODE"] == ""
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_API_KEY", "y" * 40)
    assert configure_wandb_mode() == "online"


# ------------------------------------------------------------------------------------------ W&B
@wandb_helpers.wandb_timeout(180)
def test_recipe_logs_an_offline_wandb_run_with_config_metrics_and_sparsity(tmp_path, monkeypatch,
                                                                           quiet_single_thread):
    wandb = pytest.importorskip("wandb")
    wandb_helpers.offline_wandb_env(monkeypatch, tmp_path)
    monkeypatch.setenv("WANDB_MODE", "")  # not set by the user: the CLI must choose offline by itself
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    try:
        cli = run_cli(["fit", "--config", "resnet18_abwsp", *smoke_args(tmp_path),
                       "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.log_every_n_steps", "1"])
    finally:
        wandb.teardown()  # the CLI finished the run; teardown waits until the service has flushed the offline log
    check_smoke_run(cli, "resnet18_abwsp")
    (run_dir,) = (Path(p) for p in glob.glob(str(tmp_path / "wandb" / "offline-run-*")))
    assert cli.fit_summary["wandb_run_dir"] == str(run_dir) and cli.fit_summary["wandb_mode"] == "offline"

    config = wandb_helpers.wandb_config(run_dir)
    assert config["recipe"] == "resnet18_abwsp"
    recipe = config["config"]
    assert recipe["pruning"]["class_path"] == "lightning_winoprune.WinogradPruning"
    assert recipe["pruning"]["init_args"]["method"] == "abwsp" and recipe["pruning"]["init_args"]["start_epoch"] == 1
    assert recipe["data"]["init_args"]["image_size"] == 16 and recipe["trainer"]["max_epochs"] == 2
    assert config["model_name"] == "resnet18" and config["lr"] == 0.1  # the model's hparams
    assert config["num_classes"] == 10 and config["image_size"] == 16  # linked from the data; the data's hparams
    assert (run_dir / "files" / "config.yaml").read_text().count("abwsp") >= 1

    summary = wandb_helpers.wandb_summary(run_dir)
    for key in ("train/loss_step", "train/acc", "val/loss", "val/acc", "val/acc_top5", "test/acc",
                "summary/dense_val_acc", "summary/test_acc", "winograd_pruning/sparsity"):
        assert key in summary, key
    pruner = next(cb for cb in cli.trainer.callbacks if isinstance(cb, WinogradPruning))
    for name in pruner.layer_names:
        assert summary[f"winograd_pruning/sparsity/{name}"] == pytest.approx(
            cli.model.get_submodule(name).sparsity)
    assert summary["winograd_pruning/layers"]["_type"] == "table-file"
    assert summary["winograd_pruning/masks"]["_type"] == "images/separated"
    assert summary["summary/test_acc"] == pytest.approx(cli.fit_summary["test_acc"])
    # the latency report: speedups as metrics, the table, the bar chart and the plot
    latency = next(cb for cb in cli.trainer.callbacks if isinstance(cb, LatencyValidation)).report
    assert summary["latency/layer_speedup"] == pytest.approx(latency.layer_speedup)
    assert summary["latency/model_speedup"] == pytest.approx(latency.model.speedup)
    assert summary["latency/layers"]["_type"] == "table-file"
    assert "latency/speedup_chart_table" in summary and summary["latency/plot"]["_type"] == "image-file"


def test_checkpoint_of_a_recipe_run_tests_through_the_cli(smoke_runs, tmp_path, quiet_single_thread):
    best = smoke_runs("mobilenetv2_100_deprune_bh").fit_summary["best_checkpoint"]
    test = run_cli(["test", "--config", "mobilenetv2_100_deprune_bh", "--trainer.logger", "false",
                    "--trainer.limit_test_batches", "1", "--data.image_size", "16", "--pruning.verbose", "0",
                    "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", best])
    assert test is not None and test.fit_summary is None
    masks = {n: m.weight_mask for n, m in test.model.named_modules() if hasattr(m, "weight_mask")}
    assert masks and any(not bool(m.all()) for m in masks.values())  # the pruned masks came back from the file
    for name, mask in masks.items():
        weight = test.model.get_submodule(name).weight
        assert torch.equal(weight * ~mask, torch.zeros_like(weight))


@pytest.mark.parametrize("recipe", ["resnet18_wspr", "mobilenetv2_100_deprune_bh"])
def test_deploy_subcommand_saves_a_pt2_that_matches_the_checkpoint(recipe, smoke_runs, tmp_path, capsys,
                                                                   quiet_single_thread):
    best = smoke_runs(recipe).fit_summary["best_checkpoint"]
    out = tmp_path / "model.pt2"
    dynamic = "batch+hw" if recipe.startswith("resnet") else "batch"
    main(["deploy", best, "--output", str(out), "--input-size", "16", "--no-tune", "--dynamic", dynamic])
    assert out.is_file() and f"deployed model saved to {out}" in capsys.readouterr().out
    hparams = torch.load(best, weights_only=False)["hyper_parameters"]
    module = ImageClassifier(**{k: v for k, v in hparams.items() if not k.startswith("_")})
    load_pruned_checkpoint(module, best)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        expected = module.eval().model(x)
    got = torch.export.load(str(out)).module()(x)
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-4
    if dynamic == "batch+hw":  # another resolution than the one it was tuned at
        x = torch.randn(2, 1, 23, 19)
        with torch.no_grad():
            expected = module.model(x)
        got = load_deployed(out)(x)
        assert float((got - expected).abs().max() / expected.abs().max()) < 1e-4


def _bad_files(best: str, folder: Path) -> dict[str, Path]:
    """A truncated checkpoint, a garbage file, a checkpoint of an unrelated model and a broken .pt2."""
    data = Path(best).read_bytes()
    files = {"truncated": folder / "truncated.ckpt", "garbage": folder / "garbage.ckpt",
             "unrelated": folder / "unrelated.ckpt", "pt2": folder / "model.pt2"}
    files["truncated"].write_bytes(data[: len(data) // 3])
    files["garbage"].write_bytes(os.urandom(4096))
    ckpt = torch.load(best, weights_only=True)
    ckpt["hyper_parameters"]["model_name"] = "vgg11"  # other layer names and shapes than the weights
    torch.save(ckpt, files["unrelated"])
    files["pt2"].write_bytes(data[:1000])
    return files


@pytest.mark.parametrize(("args", "message"), [
    (["missing.ckpt"], "checkpoint 'missing.ckpt': no such file"),
    (["{ckpt}", "--input-size", "0"], "--input-size must be >= 1, got 0"),
    (["{truncated}"], "truncated.ckpt' is not a torch checkpoint (not a zip archive"),
    (["{garbage}"], "garbage.ckpt' is not a torch checkpoint"),
    (["{unrelated}"], "unrelated.ckpt' does not rebuild its model: the checkpoint does not fit this model"),
    (["{pt2}"], "model.pt2' is a .pt2, a model that is deployed already"),
])
def test_deploy_subcommand_errors_are_short(args, message, smoke_runs, capsys, tmp_path):
    best = smoke_runs("resnet18_wspr").fit_summary["best_checkpoint"]
    names = {k: str(v) for k, v in _bad_files(best, tmp_path).items()}
    with pytest.raises(SystemExit) as exit_info:
        main(["deploy", *[a.format(ckpt=best, **names) for a in args]])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) <= 3


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_fit_and_test_refuse_a_hostile_ckpt_path_in_one_line(tmp_path, capsys):
    marker = tmp_path / "ran"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "x": _Payload(marker)}, tmp_path / "evil.ckpt")
    for command in ("fit", "test"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--config", "resnet18_abwsp", "--trainer.logger", "false", "--ckpt_path",
                  str(tmp_path / "evil.ckpt")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "evil.ckpt' was refused" in err and "--trust_checkpoint true" in err and len(err.splitlines()) == 2
    assert not marker.exists()
