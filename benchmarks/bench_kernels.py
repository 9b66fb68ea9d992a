"""Native kernel latencies against ``torch.nn.functional.conv2d``, side by side in one process.

Covers the 3x3 stride-1 layers of ResNet-18 and VGG-16 at ImageNet resolution (batch 1 and 8): dense Winograd
F(2,3) / F(4,3), and BWSP / WSP-R / WSP-C / WWP at 50/70/90% (masks from the project's own pruning engine), the
depthwise layers of MobileNetV2 and EfficientNet-B0 (DEPrune DCP-BH at 50/70/90%), the max pools of ResNet and
VGG-16 (our pooling kernel against ``F.max_pool2d``), and timm ``resnet18`` end to end at 224x224, batch 1, 70%
BWSP. Every number is a median of interleaved runs after warm-up with preallocated outputs; ratios are torch time
/ our time (> 1 is faster than PyTorch).

Threads are pinned: the script re-executes itself with ``OMP_PROC_BIND=close OMP_PLACES=cores`` unless they are
set. Run on a quiet machine::

    python benchmarks/bench_kernels.py                 # everything (about 10 minutes on 2 cores)
    python benchmarks/bench_kernels.py --quick         # batch 1, 70% only, fewer repeats (about 2 minutes)
    python benchmarks/bench_kernels.py --section depthwise --repeats 50
    python benchmarks/bench_kernels.py --section pooling
    python benchmarks/bench_kernels.py --stages        # each stage of the Winograd kernel, and its efficiency

``--stages`` times the three stages of our Winograd kernel (input transform, sparse GEMM, output transform) inside
each ResNet-18 layer, dense and BWSP 70%, F(2,3), and reports each layer's efficiency: kept multiply-adds per second
as a share of this machine's FMA peak. The peak is measured, not looked up: every thread runs independent FMA chains
on the dispatched ISA's vectors (``_C.fma_peak_gflops``), which is the most any kernel compiled for that ISA reaches.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

if os.environ.get("OMP_PROC_BIND") is None and __name__ == "__main__":
    os.environ.update(OMP_PROC_BIND="close", OMP_PLACES="cores")
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from lightning_winoprune.deploy import NativeMaxPool2d, PackedDepthwiseConv, PackedWinogradConv
from lightning_winoprune.kernels import native_available, native_isa
from lightning_winoprune.pruning._depthwise import depthwise_mask
from lightning_winoprune.pruning._methods import method_pattern, winograd_mask

# (name, C, K, H): the distinct 3x3 stride-1 layers at 224x224 input
RESNET18 = [("resnet18.layer1", 64, 64, 56), ("resnet18.layer2", 128, 128, 28), ("resnet18.layer3", 256, 256, 14),
            ("resnet18.layer4", 512, 512, 7)]
VGG16 = [("vgg16.conv1_2", 64, 64, 224), ("vgg16.conv2_2", 128, 128, 112), ("vgg16.conv3_x", 256, 256, 56),
         ("vgg16.conv4_1", 256, 512, 28), ("vgg16.conv4_x", 512, 512, 28), ("vgg16.conv5_x", 512, 512, 14)]
# (name, C, kernel, stride, H): the distinct depthwise layers at 224x224 input
DEPTHWISE = [
    ("mbv2.dw32", 32, 3, 1, 112), ("mbv2.dw96s2", 96, 3, 2, 112), ("mbv2.dw144", 144, 3, 1, 56),
    ("mbv2.dw144s2", 144, 3, 2, 56), ("mbv2.dw192", 192, 3, 1, 28), ("mbv2.dw384", 384, 3, 1, 14),
    ("mbv2.dw576", 576, 3, 1, 14), ("mbv2.dw960", 960, 3, 1, 7),
    ("effb0.dw144k5s2", 144, 5, 2, 56), ("effb0.dw240k5", 240, 5, 1, 28), ("effb0.dw480k5", 480, 5, 1, 14),
    ("effb0.dw672k5", 672, 5, 1, 14), ("effb0.dw1152k5", 1152, 5, 1, 7), ("effb0.dw1152", 1152, 3, 1, 7),
]
# (name, C, H, kernel, stride, padding): the max pools at 224x224 input
POOLS = [("resnet.stem_pool", 64, 112, 3, 2, 1), ("vgg16.pool1", 64, 224, 2, 2, 0), ("vgg16.pool2", 128, 112, 2, 2, 0),
         ("vgg16.pool3", 256, 56, 2, 2, 0), ("vgg16.pool4", 512, 28, 2, 2, 0), ("vgg16.pool5", 512, 14, 2, 2, 0)]
METHODS = ["bwsp", "wsp-r", "wsp-c", "wwp"]
GOALS = {"F(2,3) BWSP/WSP-R 70% on big layers": 2.5, "F(4,3) BWSP/WSP-R 70% on big layers": 3.5,
         "dense F(4,3)": 1.2, "pruned depthwise 70%": 1.5, "resnet18 end to end 70% BWSP": 2.0}


def medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 3,
            budget_s: float | None = None) -> dict[str, float]:
    """Median ms of each function, interleaved in rounds; stops early once ``budget_s`` is spent (>= 5 rounds)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    for r in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
        if budget_s is not None and r >= 4 and time.perf_counter() - start > budget_s:
            break
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def winograd_masks(c: int, k: int, m: int, amounts: list[float], gen: torch.Generator) -> dict[str, torch.Tensor]:
    u = torch.randn(k, c, m + 2, m + 2, generator=gen)
    out = {}
    for method in METHODS:
        for a in amounts:
            out[f"{method}@{round(a * 100)}"] = winograd_mask(u, a, method_pattern(method))[0]
    out["_u"] = u
    return out


def bench_winograd(console: Console, batches: list[int], amounts: list[float], repeats: int, threads: int,
                   layers: list[tuple[str, int, int, int]]) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for name, c, k, h in layers:
        for n in batches:
            x = torch.randn(n, c, h, h, generator=gen)
            w = torch.randn(k, c, 3, 3, generator=gen)
            for m in (2, 4):
                masks = winograd_masks(c, k, m, amounts, gen)
                u = masks.pop("_u")
                fns: dict[str, Callable[[], object]] = {"torch": lambda x=x, w=w: F.conv2d(x, w, padding=1)}
                packed = {"dense": PackedWinogradConv(u, None, m, 1, backend="native", threads=threads)}
                for key, mask in masks.items():
                    form = "csr" if key.startswith("wwp") else "structured"
                    packed[key] = PackedWinogradConv(u, mask, m, 1, form=form, backend="native", threads=threads)
                for key, pk in packed.items():
                    fns[key] = lambda pk=pk, x=x: pk(x)
                # the first call checks every kernel against the dense-mask reference shape
                for pk in packed.values():
                    assert tuple(pk(x).shape) == (n, k, h, h)
                med = medians(fns, repeats, budget_s=20.0)
                row = {"layer": name, "C": c, "K": k, "H": h, "batch": n, "m": m, "torch_ms": med["torch"],
                       "ms": {key: med[key] for key in packed},
                       "ratio": {key: med["torch"] / med[key] for key in packed}}
                rows.append(row)
                best = ", ".join(f"{key} {row['ratio'][key]:.2f}x" for key in packed if "@70" in key or key == "dense")
                console.print(f"{name} b{n} F({m},3): torch {med['torch']:.2f} ms | {best}")
    return rows


def _profile(pk: PackedWinogradConv, x: torch.Tensor, out: torch.Tensor, threads: int) -> dict[str, float]:
    """One run of ``pk``'s plan with each stage timed (thread-seconds)."""
    from lightning_winoprune.kernels._backend import native_module

    bias = None if pk.bias is None else pk.bias.numpy()
    return native_module().winograd_profile(x.numpy(), pk.plan_meta.numpy(), pk.plan_cols.numpy(),
                                            pk.plan_vals.numpy(), pk.plan_acc.numpy(), bias, pk.act_code, 1, 1,
                                            out.numpy(), threads)


def bench_stages(console: Console, batches: list[int], repeats: int, threads: int) -> dict:
    """Stage shares and efficiency of our F(2,3) kernel on ResNet-18's 3x3 layers, dense and BWSP 70%."""
    from lightning_winoprune.kernels._backend import native_module

    native = native_module()
    peak = statistics.median(native.fma_peak_gflops(threads) for _ in range(5))
    console.print(f"FMA peak, {native.isa()} vectors, {threads} threads: {peak:.0f} GFLOP/s (median of 5)")
    rows, gen = [], torch.Generator().manual_seed(0)
    for name, c, k, h in RESNET18:
        u = torch.randn(k, c, 4, 4, generator=gen)
        for n in batches:
            x, out = torch.randn(n, c, h, h, generator=gen), torch.empty(n, k, h, h)
            for key, mask in (("dense", None), ("bwsp@70", winograd_mask(u, 0.7, method_pattern("bwsp"))[0])):
                pk = PackedWinogradConv(u, mask, 2, 1, backend="native", threads=threads)
                info = native.winograd_plan_info(pk.plan_meta.numpy())
                ms = medians({"total": lambda pk=pk, x=x: pk(x)}, repeats)["total"]
                stages = [_profile(pk, x, out, threads) for _ in range(repeats)]
                sec = {s: statistics.median(r[s] for r in stages) for s in ("input", "gemm", "output")}
                tiles = n * ((h + 1) // 2) ** 2
                rows.append({"layer": name, "batch": n, "mask": key, "ms": ms, "stage_thread_s": sec,
                             "share": {s: v / sum(sec.values()) for s, v in sec.items()},
                             "kept_macs": info.kept * tiles, "work_macs": info.work * tiles,
                             "efficiency": 2 * info.kept * tiles / (ms * 1e-3) / (peak * 1e9),
                             "work_efficiency": 2 * info.work * tiles / (ms * 1e-3) / (peak * 1e9)})
    table = Table(title=f"our F(2,3) kernel by stage ({threads} threads, ISA {native.isa()}, peak {peak:.0f} GFLOP/s)")
    for col in ("layer", "batch", "mask", "ms", "input", "GEMM", "output", "kept MACs", "efficiency",
                "incl. padding"):
        table.add_column(col, justify="left" if col in ("layer", "mask") else "right")
    for r in rows:
        sh = r["share"]
        table.add_row(r["layer"], str(r["batch"]), r["mask"], f"{r['ms']:.3f}", f"{sh['input']:.0%}",
                      f"{sh['gemm']:.0%}", f"{sh['output']:.0%}", f"{r['kept_macs'] / 1e6:.1f} M",
                      f"{r['efficiency']:.1%}", f"{r['work_efficiency']:.1%}")
    console.print(table)
    return {"peak_gflops": peak, "rows": rows}


def bench_depthwise(console: Console, batches: list[int], amounts: list[float], repeats: int,
                    threads: int) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(1)
    for name, c, ks, s, h in DEPTHWISE:
        for n in batches:
            x = torch.randn(n, c, h, h, generator=gen)
            w = torch.randn(c, 1, ks, ks, generator=gen)
            pad = ks // 2
            packed = {"dense": PackedDepthwiseConv(w, None, s, pad, backend="native", threads=threads)}
            for a in amounts:
                mask = depthwise_mask(w, a, "dcp-bh").mask.bool()
                packed[f"dcp-bh@{round(a * 100)}"] = PackedDepthwiseConv(w, mask, s, pad, backend="native",
                                                                         threads=threads)
            for key, pk in packed.items():
                ref = F.conv2d(x, pk.weight, None, s, pad, groups=c)
                err = float((pk(x) - ref).abs().max())
                assert err < 1e-4, (name, key, err)
            fns: dict[str, Callable[[], object]] = {"torch": lambda x=x, w=w, s=s, p=pad, c=c: F.conv2d(
                x, w, None, s, p, groups=c)}
            fns.update({key: (lambda pk=pk, x=x: pk(x)) for key, pk in packed.items()})
            med = medians(fns, repeats, budget_s=10.0)
            row = {"layer": name, "C": c, "kernel": ks, "stride": s, "H": h, "batch": n, "torch_ms": med["torch"],
                   "ms": {k: med[k] for k in packed}, "ratio": {k: med["torch"] / med[k] for k in packed}}
            rows.append(row)
            console.print(f"{name} b{n}: torch {med['torch']:.3f} ms | "
                          + ", ".join(f"{k} {row['ratio'][k]:.2f}x" for k in packed))
    return rows


def bench_pooling(console: Console, batches: list[int], repeats: int, threads: int) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(2)
    for name, c, h, k, s, p in POOLS:
        for n in batches:
            x = torch.randn(n, c, h, h, generator=gen)
            pool = NativeMaxPool2d(k, s, p, threads=threads)
            assert torch.equal(pool(x), F.max_pool2d(x, k, s, p)), name
            med = medians({"torch": lambda x=x, k=k, s=s, p=p: F.max_pool2d(x, k, s, p),
                           "ours": lambda pool=pool, x=x: pool(x)}, repeats, budget_s=10.0)
            row = {"layer": name, "C": c, "H": h, "kernel": k, "stride": s, "padding": p, "batch": n,
                   "torch_ms": med["torch"], "ms": med["ours"], "ratio": med["torch"] / med["ours"]}
            rows.append(row)
            console.print(f"{name} {c}x{h}x{h} k{k} s{s} p{p} b{n}: torch {med['torch']:.3f} ms, ours "
                          f"{med['ours']:.3f} ms, {row['ratio']:.2f}x")
    return rows


def bench_end_to_end(console: Console, repeats: int, threads: int) -> dict:
    import timm

    from lightning_winoprune import measure_latency, winogradize
    from lightning_winoprune.winograd import WinogradConv2d

    out = {}
    for m in (2, 4):
        torch.manual_seed(0)
        # zero_init_last=False: with timm's zero-initialised last BN of each block the output check could not see
        # a wrong kernel in the conv2 layers
        model = timm.create_model("resnet18", num_classes=1000, zero_init_last=False).eval()
        winogradize(model, m=m)
        for mod in model.modules():
            if isinstance(mod, WinogradConv2d):
                mod.set_mask(winograd_mask(mod.weight.detach(), 0.7, method_pattern("bwsp"))[0])
                mod.zero_pruned_()
        report = measure_latency(model, torch.randn(1, 3, 224, 224), repeats=repeats, threads=threads,
                                 progress=False)
        console.print(report)
        out[f"F({m},3)"] = report.to_dict()
    return out


def summary_table(console: Console, wino: list[dict], dw: list[dict],
                  e2e: dict) -> dict[str, tuple[float, float] | None]:
    t = Table(title="Ratios against torch.nn.functional.conv2d (median, same process; > 1 is faster)")
    amounts = sorted({k.split("@")[1] for r in wino for k in r["ratio"] if "@" in k}, key=int)
    cols = ["dense"] + [f"{m}@{a}" for a in amounts for m in METHODS]
    t.add_column("layer")
    t.add_column("batch")
    t.add_column("F")
    t.add_column("torch ms", justify="right")
    for c in cols:
        t.add_column(c, justify="right")
    for r in wino:
        t.add_row(r["layer"], str(r["batch"]), str(r["m"]), f"{r['torch_ms']:.2f}",
                  *[f"{r['ratio'][c]:.2f}" if c in r["ratio"] else "-" for c in cols])
    if wino:
        console.print(t)
    t2 = Table(title="Pruned depthwise (DEPrune DCP-BH) against torch depthwise conv")
    dcols = sorted({k for r in dw for k in r["ratio"]}, key=lambda k: (k != "dense", k))
    for c in ["layer", "batch", "torch ms", *dcols]:
        t2.add_column(c, justify="left" if c == "layer" else "right")
    for r in dw:
        t2.add_row(r["layer"], str(r["batch"]), f"{r['torch_ms']:.3f}", *[f"{r['ratio'][c]:.2f}" for c in dcols])
    if dw:
        console.print(t2)

    # "big" layers: at least 0.4 GFLOP as a dense direct conv (all of VGG-16's; ResNet-18's at batch 8)
    big = [r for r in wino if 2 * 9 * r["C"] * r["K"] * r["H"] * r["H"] * r["batch"] >= 4e8]

    def stat(m: int, keys: list[str]) -> tuple[float, float] | None:
        vals = [min(r["ratio"][k] for k in keys) for r in big if r["m"] == m and all(k in r["ratio"] for k in keys)]
        return (statistics.median(vals), min(vals)) if vals else None

    dw70 = [r["ratio"]["dcp-bh@70"] for r in dw if "dcp-bh@70" in r["ratio"]]
    e2e_val = e2e["F(2,3)"]["model"]["speedup"] if e2e else None
    achieved: dict[str, tuple[float, float] | None] = {
        "F(2,3) BWSP/WSP-R 70% on big layers": stat(2, ["bwsp@70", "wsp-r@70"]),
        "F(4,3) BWSP/WSP-R 70% on big layers": stat(4, ["bwsp@70", "wsp-r@70"]),
        "dense F(4,3)": stat(4, ["dense"]),
        "pruned depthwise 70%": (statistics.median(dw70), min(dw70)) if dw70 else None,
        "resnet18 end to end 70% BWSP": None if e2e_val is None else (e2e_val, e2e_val),
    }
    wwp_slower = [r["ratio"][f"wwp@{a}"] < r["ratio"][f"bwsp@{a}"] for r in wino for a in amounts
                  if f"wwp@{a}" in r["ratio"]]
    t3 = Table(title="Goals: median over the layers (worst layer); big = >= 0.4 GFLOP dense")
    for c in ("goal", "target", "median (worst)", "met (median)"):
        t3.add_column(c)
    for goal, target in GOALS.items():
        val = achieved[goal]
        t3.add_row(goal, f">= {target}x", "-" if val is None else f"{val[0]:.2f}x ({val[1]:.2f}x)",
                   "-" if val is None else ("yes" if val[0] >= target else "NO"))
    if wwp_slower:
        t3.add_row("WWP CSR slower than BWSP at the same ratio", "all rows", f"{sum(wwp_slower)}/{len(wwp_slower)}",
                   "yes" if all(wwp_slower) else "NO")
    console.print(t3)
    return achieved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--section", choices=["all", "winograd", "depthwise", "pooling", "end-to-end"], default="all")
    ap.add_argument("--quick", action="store_true", help="batch 1, 70%% only, 10 repeats")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds per median (default 30, quick 10)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default="benchmarks/results/kernels.json")
    ap.add_argument("--stages", action="store_true",
                    help="only the Winograd kernel's stages and efficiency against the measured FMA peak")
    args = ap.parse_args()
    console = Console(width=200)
    if not native_available():
        sys.exit("the native extension is not loaded: install the package with `pip install .` first")
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (10 if args.quick else 30)
    batches = [1] if args.quick else [1, 8]
    amounts = [0.7] if args.quick else [0.5, 0.7, 0.9]
    console.print(f"torch {torch.__version__}, ISA {native_isa()}, {args.threads} threads, "
                  f"OMP_PROC_BIND={os.environ.get('OMP_PROC_BIND')} OMP_PLACES={os.environ.get('OMP_PLACES')}, "
                  f"{platform.processor() or platform.machine()}")
    if args.stages:
        result = bench_stages(console, batches, repeats, args.threads)
        out = Path(args.out).with_name("kernel_stages.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"threads": args.threads, "isa": native_isa(), "torch": torch.__version__,
                                   **result}, indent=1))
        console.print(f"results written to {out}")
        return
    wino = dw = []
    e2e: dict = {}
    if args.section in ("all", "winograd"):
        wino = bench_winograd(console, batches, amounts, repeats, args.threads, RESNET18 + VGG16)
    if args.section in ("all", "depthwise"):
        dw = bench_depthwise(console, batches, amounts, repeats, args.threads)
    pools: list[dict] = []
    if args.section in ("all", "pooling"):
        pools = bench_pooling(console, batches, repeats, args.threads)
    if args.section in ("all", "end-to-end"):
        e2e = bench_end_to_end(console, repeats, args.threads)
    achieved = summary_table(console, wino, dw, e2e)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "isa": native_isa(), "torch": torch.__version__,
                               "winograd": wino, "depthwise": dw, "pooling": pools, "end_to_end": e2e,
                               "goals": achieved}, indent=1))
    console.print(f"results written to {out}")


if __name__ == "__main__":
    main()
