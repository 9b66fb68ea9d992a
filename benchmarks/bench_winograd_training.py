"""Train-step cost of Winograd-domain training: timm resnet18, dense vs ``winogradize(m=2)``, side by side.

One process, same input, same optimizer: each repetition times one dense step and one Winograd step back to back
(interleaved, so drift in machine load hits both alike). Prints the median step times and their ratio.

    python benchmarks/bench_winograd_training.py [--size 32] [--batch 64] [--reps 30] [--m 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import timm
import torch
import torch.nn.functional as F

import lightning_winoprune as lw


def make_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def step() -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        return time.perf_counter() - t0

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--m", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--route", default="auto")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--json", help="write the results to this JSON file")
    args = ap.parse_args()

    torch.manual_seed(0)
    # zero_init_last=False: timm zero-inits the last BN of each residual block, which would hide every converted
    # conv from the equivalence check below (the residual branches would output exactly zero).
    kwargs = {"zero_init_last": False} if "resnet" in args.model else {}
    dense = timm.create_model(args.model, num_classes=10, **kwargs)
    wino = copy.deepcopy(dense)
    report = lw.winogradize(wino, m=args.m, route=args.route, backend=args.backend)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))
    with torch.no_grad():
        dense.eval(), wino.eval()
        ref = dense(x)
        err = ((wino(x) - ref).abs().max() / ref.abs().max()).item()
        dense.train(), wino.train()
    steps = {"dense": make_step(dense, x, y), "winograd": make_step(wino, x, y)}
    for _ in range(args.warmup):
        for s in steps.values():
            s()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.reps):
        for k, s in steps.items():
            times[k].append(s())
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    ratio = med["winograd"] / med["dense"]
    print(f"{args.model} {args.size}x{args.size} batch {args.batch}, F({args.m},3), {len(report)} convs converted, "
          f"{torch.get_num_threads()} threads, extension: {lw.extension_status()}")
    print(f"eval output rel. max error after conversion: {err:.2e}")
    print(f"{'variant':<10} {'median ms':>10} {'p10 ms':>8} {'p90 ms':>8}")
    for k, v in times.items():
        q = statistics.quantiles([t * 1e3 for t in v], n=10)
        print(f"{k:<10} {med[k]:>10.2f} {q[0]:>8.2f} {q[-1]:>8.2f}")
    print(f"ratio winograd/dense: {ratio:.3f}  (goal <= 1.5)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "median_ms": med, "ratio": ratio, "rel_err": err,
                       "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
                      fh, indent=2)


if __name__ == "__main__":
    main()
