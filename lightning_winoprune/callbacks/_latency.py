"""``LatencyValidation``: at the end of fit, deploy the best pruned model, save it, and prove its speedup."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_winoprune._io import load_checkpoint
from lightning_winoprune.callbacks._base import check_choice, check_positive_int, print_rich
from lightning_winoprune.deploy import deploy, save_deployed
from lightning_winoprune.kernels._backend import Backend
from lightning_winoprune.latency import LatencyReport, measure_latency

__all__ = ["LatencyValidation"]


def _first_images(trainer: pl.Trainer) -> torch.Tensor:
    """The images of the first validation batch (training batch if there is no validation loader)."""
    loaders: list[Any] = []
    dm = trainer.datamodule  # type: ignore[attr-defined]
    for source in (trainer.val_dataloaders, trainer.train_dataloader):
        if source is not None:
            loaders.append(source)
    if dm is not None:
        for getter in ("val_dataloader", "train_dataloader"):
            try:
                loaders.append(getattr(dm, getter)())
            except (AttributeError, NotImplementedError, TypeError):
                continue
    for loader in loaders:
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        if loader is None:
            continue
        batch = next(iter(loader))
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if isinstance(x, dict):
            x = next(v for v in x.values() if isinstance(v, torch.Tensor))
        if isinstance(x, torch.Tensor) and x.dim() == 4:
            return x
    raise MisconfigurationException(
        "LatencyValidation needs an example image batch: the trainer has no train/val dataloader with (N, C, H, W) "
        "images; call `lightning_winoprune.measure_latency(model, example_input)` yourself instead"
    )


def _best_module(trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[pl.LightningModule, str]:
    """The best checkpoint's weights in a copy of ``pl_module`` (or ``pl_module`` itself), and where they came from."""
    ckpt = getattr(trainer.checkpoint_callback, "best_model_path", "") or ""
    if not ckpt or not Path(ckpt).is_file():
        return pl_module, "the model at the end of fit"
    best = copy.deepcopy(pl_module)
    try:
        state = load_checkpoint(ckpt)["state_dict"]
        best.load_state_dict(state)
    except (RuntimeError, KeyError, OSError, ValueError) as err:
        rank_zero_warn(f"LatencyValidation: the best checkpoint {ckpt} does not load into the fitted model ({err}); "
                       "deploying the model at the end of fit instead")
        return pl_module, "the model at the end of fit"
    return best, ckpt


class LatencyValidation(Callback):
    """Deploy the best pruned model at the end of fit, save it as a ``.pt2``, and measure how much faster it runs.

    It deploys the best checkpoint (the model at the end of fit when there is none) with
    :func:`~lightning_winoprune.deploy` (BatchNorms folded, activations fused, the fastest route per layer), saves it
    with ``torch.export`` beside the checkpoint (``<checkpoint>.pt2``, dynamic batch; or ``<output_dir>/model.pt2``),
    and calls :func:`~lightning_winoprune.measure_latency` with a batch built from the first validation (or training)
    images: for every pruned layer it times PyTorch's dense conv, our dense Winograd, our pruned kernel, the
    FP-equivalent smaller conv and the WWP CSR path side by side, verifies the pruned kernel's output (failing loudly
    on a mismatch), and times the whole deployed model against the best dense deployment (the dense model through the
    same pipeline, and on torch eager): the headline ratio is against the faster of the two. The report goes to the
    console (rich table), to ``<output_dir>/latency.json`` and ``latency.png``, and to every logger of the trainer:
    per-layer speedups as metrics, and with a :class:`~lightning.pytorch.loggers.WandbLogger` also a table, a speedup
    bar chart and the PNG. Only rank zero measures.

    Args:
        batch_size: Images per timed batch (1 for latency, more for throughput).
        input_size: Side of the square timed images; ``None`` uses the data's own size.
        warmup: Untimed runs of every alternative before timing.
        repeats: Timed rounds per median.
        threads: CPU threads for every alternative (``None``: torch's current count).
        backend: ``"auto"`` (native kernels when the extension is loaded), ``"native"`` or ``"torch"``.
        output_dir: Where the JSON and PNG go; default ``<trainer.log_dir or default_root_dir>/latency``.
        check_output: Verify the pruned kernels against PyTorch before timing.
        tolerance: Largest allowed relative max error of a pruned kernel's output.
        whole_model: Also time the whole model (dense eager, dense deployed, as trained, deployed pruned).
        plot: Write the PNG (and log it).
        verbose: 0 silent, 1 the report table.
        save_deployed: Save the deployed model as a ``.pt2`` (``torch.export``).
        tune: Let :func:`~lightning_winoprune.deploy` choose each layer's route by measurement.

    Raises:
        MisconfigurationException: On a bad argument (the message names it and lists valid values).

    Attributes:
        report: The last :class:`~lightning_winoprune.latency.LatencyReport` (``None`` before the end of fit and
            on ranks other than zero).
        deployed_path: The saved ``.pt2``.

    """

    def __init__(
        self,
        batch_size: int = 1,
        input_size: int | None = None,
        warmup: int = 3,
        repeats: int = 20,
        threads: int | None = None,
        backend: str = "auto",
        output_dir: str | None = None,
        check_output: bool = True,
        tolerance: float = 1e-4,
        whole_model: bool = True,
        plot: bool = True,
        verbose: int = 1,
        save_deployed: bool = True,
        tune: bool = True,
    ) -> None:
        super().__init__()
        check_positive_int("batch_size", batch_size, allow_none=False)
        check_positive_int("input_size", input_size)
        check_positive_int("repeats", repeats, allow_none=False)
        check_positive_int("threads", threads)
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise MisconfigurationException(f"warmup={warmup!r} is not valid; valid values are ints >= 0")
        check_choice("backend", backend, [b.value for b in Backend])
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance > 0:
            raise MisconfigurationException(f"tolerance={tolerance!r} is not valid; valid values are floats > 0")
        check_choice("verbose", verbose, [0, 1])
        for flag, value in (("save_deployed", save_deployed), ("tune", tune)):
            if not isinstance(value, bool):
                raise MisconfigurationException(f"{flag}={value!r} is not valid; valid values are [True, False]")
        self.batch_size, self.input_size, self.warmup, self.repeats = batch_size, input_size, warmup, repeats
        self.threads, self.backend, self.output_dir = threads, backend, output_dir
        self.check_output, self.tolerance, self.whole_model, self.plot = check_output, tolerance, whole_model, plot
        self.verbose, self.save_deployed, self.tune = verbose, save_deployed, tune
        self.report: LatencyReport | None = None
        #: Where the deployed model was saved (``None`` before the end of fit or when not saved).
        self.deployed_path: Path | None = None
        self._last: dict[str, Any] | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(batch_size=self.batch_size, input_size=self.input_size)

    def example_input(self, trainer: pl.Trainer) -> torch.Tensor:
        """The timed batch: the data's first image, resized to ``input_size``, repeated ``batch_size`` times."""
        x = _first_images(trainer)[:1].detach().to("cpu", torch.float32)
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return x.expand(self.batch_size, -1, -1, -1).contiguous()

    def _output_dir(self, trainer: pl.Trainer) -> Path:
        if self.output_dir is not None:
            return Path(self.output_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / "latency"

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        out = self._output_dir(trainer)  # trainer.log_dir broadcasts: every rank must ask, not only rank zero
        if trainer.is_global_zero:
            self.validate(trainer, pl_module, out)
        trainer.strategy.barrier("latency_validation")

    @rank_zero_only
    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                 output_dir: str | Path | None = None) -> LatencyReport:
        """Measure now, write and log the report (what ``on_fit_end`` runs).

        ``output_dir`` defaults to the callback's; without one, ``trainer.log_dir`` is used, which under DDP must
        be read on every rank (``on_fit_end`` does so and passes it here).
        """
        x = self.example_input(trainer)
        out = Path(output_dir) if output_dir is not None else self._output_dir(trainer)
        module, source = _best_module(trainer, pl_module)
        was_training = module.training
        rank_zero_info(f"LatencyValidation: deploying {source} and timing it at batch {x.shape[0]}, "
                       f"{x.shape[-2]}x{x.shape[-1]} ({self.repeats} rounds)")
        try:
            module.eval()
            deployed = deploy(module, x, tune=self.tune, threads=self.threads, backend=self.backend,
                              repeats=max(3, self.repeats // 2), warmup=self.warmup, time_model=False,
                              verbose=False)
            if self.save_deployed:
                self.deployed_path = self._save(deployed, x, source, out)
            report = measure_latency(
                module, x, repeats=self.repeats, warmup=self.warmup, threads=self.threads,
                check_output=self.check_output, tolerance=self.tolerance, whole_model=self.whole_model,
                backend=self.backend, progress=self.verbose >= 1, deployed=deployed, tune=self.tune,
            )
        finally:
            module.train(was_training)
        report.to_json(out / "latency.json")
        if self.plot:
            report.plot(out / "latency.png")
        self.report = report
        self._last = {"json": str(report.json_path), "layer_speedup": report.layer_speedup,
                      "model_speedup": None if report.model is None else report.model.speedup,
                      "deployed": None if self.deployed_path is None else str(self.deployed_path)}
        if self.verbose:
            print_rich(report, min_width=150)
            if self.deployed_path is not None:
                rank_zero_info(f"LatencyValidation: deployed model saved to {self.deployed_path} (load it with "
                               "lightning_winoprune.load_deployed(path))")
        self._log(trainer, report)
        return report

    @staticmethod
    def _save(deployed: torch.nn.Module, x: torch.Tensor, source: str, output_dir: Path) -> Path | None:
        """``torch.export`` the deployed model (dynamic batch) beside the checkpoint, or in ``output_dir``."""
        path = Path(source).with_suffix(".pt2") if source.endswith(".ckpt") else output_dir / "model.pt2"
        try:  # written atomically: a run killed mid-save leaves no half .pt2 under the final name
            save_deployed(deployed, path, x)
        except Exception as err:
            rank_zero_warn(f"LatencyValidation: torch.export of the deployed model failed ({type(err).__name__}: "
                           f"{str(err)[:300]}); no .pt2 was saved")
            return None
        return path

    def _log(self, trainer: pl.Trainer, report: LatencyReport) -> None:
        metrics: dict[str, float] = {}
        for row in report.layers:
            metrics[f"latency/{row.name}/speedup"] = row.speedup
            metrics[f"latency/{row.name}/pruned_ms"] = row.pruned_ms
            metrics[f"latency/{row.name}/torch_ms"] = row.torch_ms
        if report.layer_speedup is not None:
            metrics["latency/layer_speedup"] = report.layer_speedup
        if report.model is not None:
            metrics["latency/model_speedup"] = report.model.speedup
            metrics["latency/model_native_ms"] = report.model.native_ms
            metrics["latency/model_torch_dense_ms"] = report.model.torch_dense_ms
            metrics["latency/model_best_dense_ms"] = report.model.best_dense_ms
            if report.model.bf16_speedup is not None and report.model.native_bf16_ms is not None:
                metrics["latency/model_bf16_speedup"] = report.model.bf16_speedup
                metrics["latency/model_native_bf16_ms"] = report.model.native_bf16_ms
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            if isinstance(logger, WandbLogger):
                self._log_wandb(logger, report)

    @staticmethod
    def _log_wandb(logger: WandbLogger, report: LatencyReport) -> None:
        import wandb

        columns: list[Any] = ["layer", "kind", "shape", "kept", "torch_ms", "dense_winograd_ms", "pruned_ms",
                              "fp_equivalent_ms", "csr_ms", "speedup", "max_error"]
        rows = [[r.name, r.kind, r.shape, r.kept, r.torch_ms, r.dense_winograd_ms, r.pruned_ms, r.fp_equivalent_ms,
                 r.csr_ms, r.speedup, r.max_error] for r in report.layers]
        table = wandb.Table(columns=columns, data=rows)
        payload: dict[str, Any] = {
            "latency/layers": table,
            "latency/speedup_chart": wandb.plot.bar(table, "layer", "speedup", title="speedup over PyTorch dense conv"),
        }
        if report.png_path is not None:
            payload["latency/plot"] = wandb.Image(str(report.png_path))
        logger.experiment.log(payload)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last": self._last}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last = state_dict.get("last")
