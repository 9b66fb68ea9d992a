"""Train-step cost of Winograd-domain training: timm model, dense vs ``winogradize(m)`` vs pruned, side by side.

One process, same input, same optimizer (SGD, momentum 0.9, weight decay 1e-4). Each repetition times one step of
every variant back to back (interleaved, so drift in machine load hits all alike):

* ``dense``: the timm model as it is (spatial 3x3 convs through torch/oneDNN);
* ``winograd``: the same model after ``winogradize(m)``, weights in the Winograd domain, no mask;
* ``pruned``: ``winograd`` with a ``--method`` mask of ``--amount`` on every converted layer (the pruning engine's
  mask, set on the layers; no callback), so each layer takes the route its ``auto`` choice measures fastest.

Then, unless ``--no-upkeep``, a short Lightning fit with the ``WinogradPruning`` callback measures the mask upkeep:
the time the callback's per-step hooks take, as a fraction of the step.

Prints medians, p10/p90 and the ratios to ``dense``; ``--json`` writes them. ``--per-layer`` also times every pruned
layer alone on each route it can take (forward + backward at its input shape in the model, interleaved).

    python benchmarks/bench_winograd_training.py [--size 32] [--batch 64] [--m 2] [--amount 0.7] [--method bwsp]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import lightning_winoprune as lw
from lightning_winoprune.pruning import method_pattern, winograd_mask
from lightning_winoprune.winograd import Route, iter_winograd_layers


def make_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def step() -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        return time.perf_counter() - t0

    return step


def prune_layers(model: torch.nn.Module, method: str, amount: float) -> float:
    """Set ``method``'s mask of ``amount`` on every Winograd layer; returns the overall sparsity."""
    pattern = method_pattern(method)
    kept = total = 0
    for _, layer in iter_winograd_layers(model):
        mask, _ = winograd_mask(layer.weight, amount, pattern)
        layer.set_mask(mask)
        layer.zero_pruned_()
        kept += int(mask.sum())
        total += mask.numel()
    return 1.0 - kept / total


def routes(model: torch.nn.Module) -> dict[str, str]:
    return {name: (getattr(layer, "last_route", None) or layer.route).value
            for name, layer in iter_winograd_layers(model)}


def per_layer_routes(model: torch.nn.Module, x: torch.Tensor, reps: int) -> dict[str, dict[str, float]]:
    """Median ms of one forward + backward of every Winograd layer alone, per route, at its input shape in ``model``."""
    shapes: dict[str, torch.Size] = {}
    hooks = [layer.register_forward_pre_hook(lambda _m, a, n=name: shapes.setdefault(n, a[0].shape) and None)
             for name, layer in iter_winograd_layers(model)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    out: dict[str, dict[str, float]] = {}
    for name, layer in iter_winograd_layers(model):
        xin = torch.randn(shapes[name], requires_grad=True)
        saved = layer.route
        layer.route = Route.AUTO
        candidates = [Route.BGEMM] + ([Route.SPARSE] if layer.mask is not None else [])
        if layer.resolve_route(xin.shape[-2], xin.shape[-1], xin.shape[0]) is Route.UNROLLED:
            candidates.append(Route.UNROLLED)
        times: dict[str, list[float]] = {r.value: [] for r in candidates}
        for i in range(reps + 2):
            for route in candidates:
                layer.route = route
                layer.weight.grad = xin.grad = None
                t0 = time.perf_counter()
                y = layer(xin)
                y.backward(torch.ones_like(y))
                if i >= 2:
                    times[route.value].append(time.perf_counter() - t0)
        layer.route = saved
        layer.weight.grad = None
        out[name] = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"  {name:<16} {tuple(shapes[name])!s:<20} " + "  ".join(f"{k} {v:.2f} ms" for k, v in out[name].items()))
    return out


class _Module(pl.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)


class _StepTimer(pl.Callback):
    """Wall time of every training batch, and a slot per batch that the timed hooks below add their time to."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.upkeep: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self.upkeep.append(0.0)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.times.append(time.perf_counter() - self._t0)


_PER_STEP_HOOKS = ("on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_after_backward",
                   "on_before_optimizer_step", "on_before_zero_grad")


def measure_upkeep(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> dict:
    """Median per-step time of the WinogradPruning callback's per-step hooks in a real fit, and its share."""
    cb = lw.WinogradPruning(method=args.method, amount=args.amount, m=args.m, verbose=0, log_masks=False)
    timer = _StepTimer()
    for hook in _PER_STEP_HOOKS:
        orig = getattr(cb, hook)

        def timed(*a: Any, _orig: Callable[..., Any] = orig, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _orig(*a, **k)
            finally:
                timer.upkeep[-1] += time.perf_counter() - t0

        setattr(cb, hook, timed)
    steps = args.upkeep_steps
    data = DataLoader(TensorDataset(x.repeat(steps, 1, 1, 1), y.repeat(steps)), batch_size=x.shape[0])
    trainer = pl.Trainer(max_epochs=2, callbacks=[timer, cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(_Module(model), data)
    # epoch 0 prunes (one-shot, at its start); the steps of epoch 1 (after 2 warm-up steps) fine-tune with masks
    per_step, step_times = timer.upkeep[steps + 2:], timer.times[steps + 2:]
    share = [u / s for u, s in zip(per_step, step_times, strict=True)]
    return {"upkeep_ms": statistics.median(per_step) * 1e3, "step_ms": statistics.median(step_times) * 1e3,
            "upkeep_share": statistics.median(share)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--m", type=int, default=2)
    ap.add_argument("--method", default="bwsp", help="pruning method of the pruned variant")
    ap.add_argument("--amount", type=float, default=0.7, help="pruned fraction of the pruned variant")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--route", default="auto")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--no-upkeep", action="store_true", help="skip the Lightning fit that measures mask upkeep")
    ap.add_argument("--upkeep-steps", type=int, default=12, help="training steps per epoch of that fit")
    ap.add_argument("--per-layer", action="store_true", help="also time every pruned layer alone on each route")
    ap.add_argument("--json", help="write the results to this JSON file")
    args = ap.parse_args()

    torch.manual_seed(0)
    # zero_init_last=False: timm zero-inits the last BN of each residual block, which would hide every converted
    # conv from the equivalence check below (the residual branches would output exactly zero).
    kwargs = {"zero_init_last": False} if "resnet" in args.model else {}
    dense = timm.create_model(args.model, num_classes=10, **kwargs)
    wino = copy.deepcopy(dense)
    report = lw.winogradize(wino, m=args.m, route=args.route, backend=args.backend)
    pruned = copy.deepcopy(wino)
    sparsity = prune_layers(pruned, args.method, args.amount)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))
    with torch.no_grad():
        dense.eval(), wino.eval()
        ref = dense(x)
        err = ((wino(x) - ref).abs().max() / ref.abs().max()).item()
        dense.train(), wino.train()
    steps = {"dense": make_step(dense, x, y), "winograd": make_step(wino, x, y), "pruned": make_step(pruned, x, y)}
    for _ in range(args.warmup):
        for s in steps.values():
            s()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.reps):
        for k, s in steps.items():
            times[k].append(s())
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    ratio = {k: med[k] / med["dense"] for k in med}
    print(f"{args.model} {args.size}x{args.size} batch {args.batch}, F({args.m},3), {len(report)} convs converted, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, extension: {lw.extension_status()}")
    print(f"eval output rel. max error after conversion: {err:.2e}")
    print(f"pruned variant: {args.method} {args.amount:.0%} (overall Winograd-domain sparsity {sparsity:.3f}); "
          f"routes: {routes(pruned)}")
    print(f"{'variant':<10} {'median ms':>10} {'p10 ms':>8} {'p90 ms':>8} {'/ dense':>8}")
    for k, v in times.items():
        q = statistics.quantiles([t * 1e3 for t in v], n=10)
        print(f"{k:<10} {med[k]:>10.2f} {q[0]:>8.2f} {q[-1]:>8.2f} {ratio[k]:>8.3f}")
    print(f"goals: winograd/dense <= 1.2 (now {ratio['winograd']:.3f}), pruned/dense <= 0.9 "
          f"(now {ratio['pruned']:.3f})")
    layers = None
    if args.per_layer:
        print("per pruned layer, forward + backward alone (medians):")
        layers = per_layer_routes(pruned, x, args.reps)
    upkeep = None
    if not args.no_upkeep:
        upkeep = measure_upkeep(copy.deepcopy(dense), x, y, args)
        print(f"mask upkeep (WinogradPruning's per-step hooks, fine-tuning epoch): {upkeep['upkeep_ms']:.3f} ms of a "
              f"{upkeep['step_ms']:.1f} ms step = {upkeep['upkeep_share']:.2%} (goal <= 1%)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "median_ms": med, "ratio": ratio, "rel_err": err, "sparsity": sparsity,
                       "routes": routes(pruned), "per_layer_ms": layers, "upkeep": upkeep, "torch": torch.__version__,
                       "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
                      fh, indent=2)


if __name__ == "__main__":
    main()
