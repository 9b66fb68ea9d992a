"""Tests of the ``LatencyValidation`` callback: the report at the end of fit, its files, the metrics every logger
gets (CSV and an offline W&B run), the example batch, errors, and its state.

(Not ``test_latency.py``: ``tests/importance/test_latency.py`` has that basename, and without ``__init__.py`` files
pytest refuses two test modules of the same name.)

A narrow timm ``resnet18`` is pruned by ``WinogradPruning(method="bwsp", amount=0.7)`` on 16x16 digits for two
steps; the callback times with ``repeats=2, warmup=0``.
"""

from __future__ import annotations

import csv
import glob
import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from wandb_helpers import offline_wandb_env, wandb_config_updates, wandb_summary, wandb_timeout

from lightning_winoprune import DEPrune, LatencyValidation, WinogradConv2d, WinogradPruning, measure_latency
from lightning_winoprune.deploy import DeployMismatchError, PackedWinogradConv
from lightning_winoprune.kernels import native_available, native_isa
from lightning_winoprune.latency import LatencyReport
from lightning_winoprune.recipes import ImageClassifier

pytestmark = [
    pytest.mark.usefixtures("quiet_single_thread"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*smaller than the logging interval.*"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*"),
]
needs_ext = pytest.mark.skipif(not native_available(), reason="the native extension is not loaded")
FAST = {"repeats": 2, "warmup": 0, "verbose": 0}


def make_module() -> ImageClassifier:
    # zero_init_last=False: with timm's zero-initialised last BN of every block, no Winograd layer reaches the logits
    return ImageClassifier("resnet18", num_classes=10, in_chans=1,
                           model_kwargs={"channels": (16, 32, 64, 128), "zero_init_last": False})


def make_trainer(callbacks: list[Callback], **overrides: Any) -> L.Trainer:
    kwargs: dict[str, Any] = {
        "accelerator": "cpu", "devices": 1, "max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1,
        "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False, "logger": False,
        "enable_checkpointing": False,
    }
    kwargs.update(overrides)
    return L.Trainer(callbacks=callbacks, **kwargs)


def fit(data: Any, cb: LatencyValidation, **trainer_kwargs: Any) -> tuple[ImageClassifier, WinogradPruning, L.Trainer]:
    module = make_module()
    pruning = WinogradPruning(method="bwsp", amount=0.7, verbose=0)
    trainer = make_trainer([pruning, cb], **trainer_kwargs)
    trainer.fit(module, data)
    return module, pruning, trainer


def winograd_layers(module: nn.Module) -> dict[str, WinogradConv2d]:
    return {n: m for n, m in module.named_modules() if isinstance(m, WinogradConv2d)}


@pytest.fixture(scope="module")
def fitted(data, tmp_path_factory):
    """One fit with the callback (native kernels when loaded), shared by the read-only checks."""
    out = tmp_path_factory.mktemp("latency")
    cb = LatencyValidation(output_dir=str(out), **FAST)
    module, pruning, trainer = fit(data, cb)
    return cb, module, pruning, trainer, out


# ------------------------------------------------------------------------------------------- 1. the report
def test_fit_reports_every_pruned_layer(fitted):
    cb, module, pruning, trainer, _ = fitted
    report = cb.report
    assert isinstance(report, LatencyReport) and trainer.state.finished
    assert [r.name for r in report.layers] == pruning.layer_names == list(winograd_layers(module))
    for row in report.layers:
        layer = module.get_submodule(row.name)
        assert row.kind == "winograd" and row.kept == pytest.approx(layer.mask.float().mean().item())
        assert row.torch_ms > 0 and row.pruned_ms > 0 and row.max_error < 1e-4
    assert report.model is not None and report.model.native_ms > 0 and report.model.max_error < 1e-4
    assert (report.batch_size, report.input_size, report.repeats) == (1, (16, 16), 2)
    assert report.isa == native_isa()


def test_json_and_png_go_to_output_dir(fitted):
    cb, _, _, _, out = fitted
    report = cb.report
    assert report.json_path == out / "latency.json" and report.png_path == out / "latency.png"
    data = json.loads((out / "latency.json").read_text())
    assert [row["name"] for row in data["layers"]] == [r.name for r in report.layers]
    assert data["layer_speedup"] == pytest.approx(report.layer_speedup)
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_output_dir_is_under_the_log_dir(data, tmp_path):
    cb = LatencyValidation(whole_model=False, **FAST)
    fit(data, cb, default_root_dir=str(tmp_path))
    assert (tmp_path / "latency" / "latency.json").is_file() and (tmp_path / "latency" / "latency.png").is_file()
    assert cb.report is not None and cb.report.model is None


def test_no_plot_no_whole_model_and_no_validation_loader(data, tmp_path):
    cb = LatencyValidation(output_dir=str(tmp_path), plot=False, whole_model=False, backend="torch", **FAST)
    _, pruning, _ = fit(data, cb, limit_val_batches=0)
    report = cb.report
    assert report is not None and report.model is None and report.png_path is None and report.isa is None
    assert (tmp_path / "latency.json").is_file() and not (tmp_path / "latency.png").exists()
    assert [r.name for r in report.layers] == pruning.layer_names


def test_verbose_prints_the_table(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # rich's width when not on a terminal (80 truncates the names)
    cb = LatencyValidation(output_dir=str(tmp_path), repeats=2, warmup=0, verbose=1, whole_model=False, plot=False)
    _, pruning, _ = fit(data, cb)
    printed = capsys.readouterr().out
    assert "Latency (median of 2, batch 1, 16x16" in printed
    assert all(name in printed for name in pruning.layer_names)


def test_deprune_depthwise_layers_are_reported(data, tmp_path):
    module = ImageClassifier("mobilenetv2_050", num_classes=10, in_chans=1)
    pruning = DEPrune(method="dcp", dw_amount=0.5, pw_amount=0.3, calibration_batches=1, verbose=0)
    cb = LatencyValidation(output_dir=str(tmp_path), **FAST)
    make_trainer([pruning, cb]).fit(module, data)
    dw = [n for n, kind in pruning.kinds.items() if kind == "dw"]
    report = cb.report
    assert report is not None and dw and [r.name for r in report.layers] == dw
    for row in report.layers:
        assert row.kind == "depthwise" and row.max_error < 1e-4
        assert row.kept == pytest.approx(module.get_submodule(row.name).weight_mask.float().mean().item())
    assert 0.4 < sum(r.kept for r in report.layers) / len(dw) < 0.6
    assert report.model is not None and report.model.max_error < 1e-4


def test_every_rank_makes_the_same_collective_calls(data, tmp_path, monkeypatch):
    """Under DDP, ``trainer.log_dir`` broadcasts and ``on_fit_end`` waits at a barrier: rank zero, which alone
    measures, must not make a collective call the other ranks do not make (it would hang)."""
    cb = LatencyValidation(whole_model=False, plot=False, **FAST)
    module, _, trainer = fit(data, cb, default_root_dir=str(tmp_path))
    calls: list[str] = []
    monkeypatch.setattr(trainer.strategy, "broadcast", lambda obj, src=0: calls.append("broadcast") or obj)
    monkeypatch.setattr(trainer.strategy, "barrier", lambda name=None: calls.append(f"barrier {name}"))
    cb.report = None
    cb.on_fit_end(trainer, module)
    assert cb.report is not None and (tmp_path / "latency" / "latency.json").is_file()
    on_rank_zero = list(calls)
    calls.clear()
    monkeypatch.setattr(type(trainer), "is_global_zero", property(lambda self: False))
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    cb.report = None
    cb.on_fit_end(trainer, module)
    assert cb.report is None  # only rank zero measures
    assert calls == on_rank_zero


@needs_ext
def test_a_wrong_kernel_fails_the_fit(data, tmp_path, monkeypatch):
    original = PackedWinogradConv.__call__
    monkeypatch.setattr(PackedWinogradConv, "__call__", lambda self, x: original(self, x) * 0)
    cb = LatencyValidation(output_dir=str(tmp_path), **FAST)
    # deploy checks every candidate route against the layer's own output first: no route is left
    with pytest.raises(DeployMismatchError, match=r"model\.layer1\.0\.conv2: no route reproduces the layer's output"):
        fit(data, cb)
    assert cb.report is None and not (tmp_path / "latency.json").exists() and cb.deployed_path is None


# ------------------------------------------------------------------------------- 2. the example batch
@pytest.mark.parametrize(("batch_size", "input_size"), [(1, None), (3, 24), (2, 8)])
def test_example_input_and_input_size_resizing(data, tmp_path, batch_size, input_size):
    cb = LatencyValidation(batch_size=batch_size, input_size=input_size, output_dir=str(tmp_path),
                           whole_model=False, plot=False, **FAST)
    _, _, trainer = fit(data, cb)
    side = input_size or 16
    x = cb.example_input(trainer)
    assert x.shape == (batch_size, 1, side, side) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert all(torch.equal(x[i], x[0]) for i in range(batch_size))  # the first image, repeated
    assert cb.report is not None
    assert cb.report.batch_size == batch_size and cb.report.input_size == (side, side)
    if input_size is None:
        assert torch.equal(x[0], next(iter(trainer.val_dataloaders))[0][0])


class VectorModule(L.LightningModule):
    """A module on 2-D feature vectors: no image batch for the callback to time."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(8, 2)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_no_image_batch_raises_and_measure_latency_works_standalone(data, tmp_path):
    loader = DataLoader(TensorDataset(torch.randn(8, 8), torch.randint(0, 2, (8,))), batch_size=4)
    cb = LatencyValidation(output_dir=str(tmp_path), **FAST)
    with pytest.raises(MisconfigurationException, match=r"needs an example image batch(?s:.*)measure_latency"):
        make_trainer([cb], limit_val_batches=0).fit(VectorModule(), loader)
    # the standalone path the message points to: the pruned model, timed by hand
    module, pruning, trainer = fit(data, LatencyValidation(output_dir=str(tmp_path), **FAST))
    x = next(iter(trainer.val_dataloaders))[0][:2]
    report = measure_latency(module, x, repeats=2, warmup=0, whole_model=False, progress=False)
    assert [r.name for r in report.layers] == pruning.layer_names and report.input_size == (16, 16)
    assert report.batch_size == 2 and all(r.max_error < 1e-4 for r in report.layers)


# ------------------------------------------------------------------------------------------------ 3. loggers
def test_csv_logger_gets_the_latency_metrics(data, tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    cb = LatencyValidation(output_dir=str(tmp_path / "out"), **FAST)
    _, pruning, trainer = fit(data, cb, logger=logger)
    report = cb.report
    assert report is not None and report.model is not None
    with (Path(logger.log_dir) / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    logged = [r for r in rows if r.get("latency/layer_speedup")]
    assert len(logged) == 1
    row = logged[0]
    assert int(row["step"]) == trainer.global_step
    assert float(row["latency/layer_speedup"]) == pytest.approx(report.layer_speedup)
    assert float(row["latency/model_speedup"]) == pytest.approx(report.model.speedup)
    assert float(row["latency/model_native_ms"]) == pytest.approx(report.model.native_ms)
    assert float(row["latency/model_torch_dense_ms"]) == pytest.approx(report.model.torch_dense_ms)
    for layer in report.layers:
        assert layer.name in pruning.layer_names
        assert float(row[f"latency/{layer.name}/speedup"]) == pytest.approx(layer.speedup)
        assert float(row[f"latency/{layer.name}/pruned_ms"]) == pytest.approx(layer.pruned_ms)
        assert float(row[f"latency/{layer.name}/torch_ms"]) == pytest.approx(layer.torch_ms)


@wandb_timeout(120)
def test_wandb_offline_run_gets_table_chart_plot_and_metrics(data, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    offline_wandb_env(monkeypatch, tmp_path)
    cb = LatencyValidation(output_dir=str(tmp_path / "out"), **FAST)
    try:
        logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="t")
        _, pruning, _ = fit(data, cb, logger=logger)
    finally:
        wandb.finish()
        # finish() can return before wandb-core has written the run's records to the offline .wandb file (seen
        # about 1 run in 5 on a loaded machine: an empty log); teardown() waits for the service to flush and exit
        wandb.teardown()
    report = cb.report
    assert report is not None and report.model is not None
    (run_dir,) = (Path(p) for p in glob.glob(str(tmp_path / "wandb" / "offline-run-*")))
    summary = wandb_summary(run_dir)
    assert summary["latency/layer_speedup"] == pytest.approx(report.layer_speedup)
    assert summary["latency/model_speedup"] == pytest.approx(report.model.speedup)
    for layer in report.layers:
        assert summary[f"latency/{layer.name}/speedup"] == pytest.approx(layer.speedup)
    # the per-layer table
    table = summary["latency/layers"]
    assert table["_type"] == "table-file" and table["nrows"] == len(pruning.layer_names)
    content = json.loads((run_dir / "files" / table["path"]).read_text())
    columns = content["columns"]
    assert {"layer", "kind", "kept", "torch_ms", "pruned_ms", "speedup", "max_error"} <= set(columns)
    assert [row[columns.index("layer")] for row in content["data"]] == pruning.layer_names
    assert [row[columns.index("speedup")] for row in content["data"]] == pytest.approx(
        [r.speedup for r in report.layers])
    # the bar chart: W&B stores its table as "<key>_table" and the chart itself in the config's _wandb.visualize
    assert summary["latency/speedup_chart_table"]["_type"] == "table-file"
    chart = wandb_config_updates(run_dir)[("_wandb", "visualize", "latency/speedup_chart")]
    assert chart["panel_config"]["panelDefId"] == "wandb/bar/v0"
    assert chart["panel_config"]["fieldSettings"] == {"label": "layer", "value": "speedup"}
    # the PNG
    image = summary["latency/plot"]
    assert image["_type"] == "image-file" and image["format"] == "png"
    assert (run_dir / "files" / image["path"]).read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------------- 4. arguments and state
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size must be a positive int, got 0"),
        ({"batch_size": None}, "batch_size must be a positive int, got None"),
        ({"input_size": 0}, "input_size must be a positive int or None, got 0"),
        ({"repeats": 0}, "repeats must be a positive int, got 0"),
        ({"threads": 0}, "threads must be a positive int or None, got 0"),
        ({"warmup": -1}, r"warmup=-1 is not valid; valid values are ints >= 0"),
        ({"warmup": 1.5}, r"warmup=1.5 is not valid"),
        ({"backend": "gpu"}, r"backend='gpu' is not valid; valid values are \['auto', 'native', 'torch'\]"),
        ({"tolerance": 0}, r"tolerance=0 is not valid; valid values are floats > 0"),
        ({"tolerance": True}, r"tolerance=True is not valid"),
        ({"verbose": 3}, r"verbose=3 is not valid; valid values are \[0, 1\]"),
        ({"save_deployed": "yes"}, r"save_deployed='yes' is not valid; valid values are \[True, False\]"),
        ({"tune": 1}, r"tune=1 is not valid; valid values are \[True, False\]"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else "",
)
def test_constructor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        LatencyValidation(**kwargs)


def test_state_dict_round_trip(fitted, tmp_path):
    cb, _, _, trainer, out = fitted
    state = cb.state_dict()
    assert state == {"last": {"json": str(out / "latency.json"), "layer_speedup": cb.report.layer_speedup,
                              "model_speedup": cb.report.model.speedup, "deployed": str(cb.deployed_path)}}
    fresh = LatencyValidation(**FAST)
    assert fresh.state_dict() == {"last": None}
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    fresh.load_state_dict({})
    assert fresh.state_dict() == {"last": None}
    # the state travels in a checkpoint under the callback's state key
    trainer.save_checkpoint(tmp_path / "end.ckpt")
    ckpt = torch.load(tmp_path / "end.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["callbacks"][cb.state_key] == state
    assert cb.state_key == LatencyValidation().state_key != LatencyValidation(batch_size=8).state_key
    assert LatencyValidation(input_size=32).state_key != cb.state_key


@needs_ext
def test_the_deployed_best_model_is_saved_as_pt2_and_reloads(data, tmp_path):
    cb = LatencyValidation(output_dir=str(tmp_path), plot=False, **FAST)
    _, _, trainer = fit(data, cb)
    assert cb.deployed_path is not None and cb.deployed_path.suffix == ".pt2" and cb.deployed_path.is_file()
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if best:  # beside the best checkpoint
        assert cb.deployed_path == Path(best).with_suffix(".pt2")
    loaded = torch.export.load(str(cb.deployed_path)).module()
    x = cb.example_input(trainer).expand(3, -1, -1, -1).contiguous()  # any batch size: the batch is dynamic
    assert loaded(x).shape[0] == 3
    assert cb.report is not None and cb.report.model is not None
    assert cb.report.model.speedup == pytest.approx(cb.report.model.best_dense_ms / cb.report.model.native_ms)
