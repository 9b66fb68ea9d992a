"""Accuracy of every Winograd pruning method at equal ratios, on scikit-learn's bundled digits (upsampled).

A timm model is trained dense once. Then, for each method and ratio, a copy is pruned one-shot by
``WinogradPruning`` and fine-tuned for the same number of epochs. One table: test accuracy right after pruning
(before fine-tuning, the purest comparison of what each pattern removes), after fine-tuning, the drop from dense,
and the per-layer policy summary. It checks the papers' ordering at equal ratio, WWP >= WSP > FP, and measures the
mask-maintenance overhead (the forward ``weight * mask`` and its backward) as a share of a train step, side by side
with the same model without masks.

    python benchmarks/bench_pruning_accuracy.py [--model resnet18] [--epochs 4] [--finetune 2] [--json out.json]
    python benchmarks/bench_pruning_accuracy.py --amounts 0.7 --precision bf16-mixed   # Trainer(precision=...)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections import Counter

import torch
import torch.nn.functional as F
from _common import PRECISION, add_precision_argument, finetune_copy, quiet, train_dense
from rich.table import Table

from lightning_winoprune import WinogradConv2d, WinogradPruning, winogradize

METHODS = ("wwp", "wsp-r", "wsp-c", "bwsp", "abwsp", "fp", "spatial-winograd")
#: Per-method arguments: spatial-Winograd runs both stages at the prune point (its own score, l2-factor), so that
#: "after pruning" compares the same sparsity as the other methods.
EXTRA = {"spatial-winograd": {"spatial_epochs": 0, "score": None}}


def mask_overhead(model: torch.nn.Module, size: int, batch: int, reps: int) -> dict[str, float]:
    """Median train-step ms of a pruned model: unmasked (same zeroed weights), masked in every forward pass
    (a standalone ``WinogradConv2d``), and maintained the way ``WinogradPruning`` does it (gradients masked once
    before each optimizer step, no multiply in the forward pass)."""
    variants = {name: copy.deepcopy(model) for name in ("unmasked", "forward_multiply", "callback")}
    for name, net in variants.items():
        for mod in net.modules():
            if isinstance(mod, WinogradConv2d):
                if name == "unmasked":
                    mod.set_mask(None)
                mod.mask_in_forward = name != "callback"
    x, y = torch.randn(batch, 1, size, size), torch.randint(0, 10, (batch,))
    steps = {}
    for name, net in variants.items():
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        layers = [m for m in net.modules() if isinstance(m, WinogradConv2d) and m.mask is not None]

        def step(net: torch.nn.Module = net, opt: torch.optim.Optimizer = opt, layers: list = layers,
                 name: str = name) -> float:
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            if name == "callback":  # exactly what WinogradPruning.on_before_optimizer_step does
                torch._foreach_mul_([m.weight.grad for m in layers], [m.mask_value() for m in layers])
            opt.step()
            return time.perf_counter() - t0

        steps[name] = step
    for _ in range(3):
        for s in steps.values():
            s()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(reps):
        for k, s in steps.items():
            times[k].append(s())
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=4, help="dense training epochs")
    ap.add_argument("--finetune", type=int, default=2, help="fine-tuning epochs after pruning (same for every run)")
    ap.add_argument("--amounts", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--score", default="l2", help="block score of every run (l2, l1, l2-scaled, taylor)")
    ap.add_argument("--overhead-reps", type=int, default=20)
    ap.add_argument("--json", help="write the results to this JSON file")
    ap.add_argument("--seed", type=int, default=0, help="seed of the dense model's initialisation and batch order")
    add_precision_argument(ap)
    args = ap.parse_args()
    PRECISION["value"] = args.precision
    console = quiet()
    dense, data, dense_acc = train_dense(args.model, args.image_size, args.epochs, console, args.seed)

    rows = []
    for amount in args.amounts:
        for method in args.methods:
            kwargs = {"score": args.score, **EXTRA.get(method, {})}
            cb = WinogradPruning(method=method, amount=amount, verbose=0, calibration_batches=4, **kwargs)
            t0 = time.perf_counter()
            module, acc_pruned, acc = finetune_copy(dense, data, cb, args.finetune)
            layers = [m for m in module.modules() if isinstance(m, WinogradConv2d)]
            sparsity = sum(m.sparsity * m.weight.numel() for m in layers) / sum(m.weight.numel() for m in layers)
            pol = Counter(cb.policies.values()) if cb.policies else Counter({method: len(layers)})
            rows.append({"method": method, "amount": amount, "sparsity": sparsity, "acc_pruned": acc_pruned,
                         "acc_finetuned": acc, "drop": dense_acc - acc,
                         "policies": ", ".join(f"{k}:{v}" for k, v in sorted(pol.items())),
                         "seconds": time.perf_counter() - t0})
            console.print(f"  {method:6} {amount:.0%}: pruned {acc_pruned:.4f} -> fine-tuned {acc:.4f}")

    table = Table(title=f"{args.model} on digits ({args.precision}): dense test accuracy {dense_acc:.4f}, "
                        f"score {args.score}, fine-tuning {args.finetune} epochs per run")
    for col in ("amount", "method", "sparsity", "acc. after pruning", "acc. fine-tuned", "drop", "policies/layer"):
        table.add_column(col, justify="right" if col not in ("method", "policies/layer") else "left")
    for r in rows:
        table.add_row(f"{r['amount']:.0%}", r["method"], f"{r['sparsity']:.3f}", f"{r['acc_pruned']:.4f}",
                      f"{r['acc_finetuned']:.4f}", f"{r['drop']:+.4f}", r["policies"])
    console.print(table)

    verdicts = []
    for amount in args.amounts:
        by = {r["method"]: r for r in rows if r["amount"] == amount}
        if {"wwp", "wsp-r", "fp"} <= by.keys():
            for key in ("acc_pruned", "acc_finetuned"):
                w, s, f = by["wwp"][key], by["wsp-r"][key], by["fp"][key]
                verdicts.append(f"{amount:.0%} {key}: WWP {w:.4f} >= WSP-R {s:.4f} > FP {f:.4f}: "
                                f"{'holds' if w >= s > f else 'does not hold'}")
    for v in verdicts:
        console.print(v)

    pruned = copy.deepcopy(dense.model)
    winogradize(pruned)
    for mod in pruned.modules():
        if isinstance(mod, WinogradConv2d):
            mod.set_mask(torch.rand_like(mod.weight) > 0.7)
            mod.zero_pruned_()
    ms = mask_overhead(pruned, args.image_size, 64, args.overhead_reps)
    overhead = {k: (v - ms["unmasked"]) / ms["unmasked"] * 100 for k, v in ms.items() if k != "unmasked"}
    console.print(f"mask maintenance, train step median: unmasked {ms['unmasked']:.2f} ms; WinogradPruning's gradient "
                  f"masking {ms['callback']:.2f} ms ({overhead['callback']:+.2f}%, goal <= 2%); masking in every "
                  f"forward pass {ms['forward_multiply']:.2f} ms ({overhead['forward_multiply']:+.2f}%)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "dense_acc": dense_acc, "rows": rows, "verdicts": verdicts,
                       "mask_step_ms": ms, "mask_overhead_pct": overhead},
                      fh, indent=2)


if __name__ == "__main__":
    main()
