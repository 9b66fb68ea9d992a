"""Whole-model latency: our deployed pruned model against the best dense deployment a user could pick.

For each timm model (random weights: latency does not depend on their values, only on the masks' structure):

* **ours**: the pruned model through ``lightning_winoprune.deploy`` (BN folded, activations fused, the fastest route
  per layer), saved with ``torch.export`` and loaded back from the ``.pt2``: exactly what a user ships.
  resnet18 / resnet50 / vgg16_bn: every stride-1 3x3 conv but the stem in the Winograd domain F(2,3), BWSP 70%.
  mobilenetv2_100 / efficientnet_b0: DEPrune-BH, depthwise 70%, pointwise filters 30% removed physically
  (torch-pruning).
* the **dense** model on torch eager, ``torch.jit.freeze``, ``torch.compile`` (inductor, freezing), ONNX Runtime and
  OpenVINO (the optional ``bench`` extra; skipped with a note when absent), and through our own ``deploy``. Every
  runtime computes in float32; OpenVINO's bfloat16 default (on CPUs with bfloat16 support) is shown as an extra
  column, not as the baseline, because it changes the model's numerics.

Runtimes with spinning thread pools distort whatever else runs in the same process, so every (model, batch,
runtime) is timed in its own process, and the runtimes take turns over ``--rounds`` rounds; the figure is the median
over rounds of each process's median. A ``prepare`` process builds the artifacts once (``.pt2`` files, ONNX) and
checks that the deployed model's output matches the pruned model's.

    python benchmarks/bench_deploy.py                      # everything: about an hour on 2 cores
    python benchmarks/bench_deploy.py --models resnet18 --batches 1 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

MODELS = ("resnet18", "resnet50", "vgg16_bn", "mobilenetv2_100", "efficientnet_b0")
RUNTIMES = ("ours", "ours-dense", "eager", "jit.freeze", "compile", "ort", "openvino", "openvino-bf16")
#: The float32 dense runtimes: the headline ratio is against the fastest of these. OpenVINO's default on CPUs with
#: bfloat16 support runs in bfloat16 (another precision: relative errors near 1e-2); it is shown, not the baseline.
DENSE_RUNTIMES = ("eager", "jit.freeze", "compile", "ort", "openvino", "ours-dense")
OUT = Path(__file__).resolve().parent / "results" / "deploy"


# ------------------------------------------------------------------------------------------------ models
def build(name: str, pruned: bool):  # type: ignore[no-untyped-def]
    """The dense or the pruned model (eval, random weights and BN statistics from a fixed seed)."""
    import timm
    import torch

    import lightning_winoprune as lw
    from lightning_winoprune.pruning._depthwise import depthwise_mask, pointwise_filter_mask
    from lightning_winoprune.pruning._methods import method_pattern, winograd_mask

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=1000)
    gen = torch.Generator().manual_seed(1)
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.copy_(torch.rand(mod.num_features, generator=gen) * 0.2 - 0.1)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=gen) + 0.5)
    model.eval()
    if not pruned:
        return model
    if name.startswith(("resnet", "vgg")):
        lw.winogradize(model, m=2)
        for mod in model.modules():
            if isinstance(mod, lw.WinogradConv2d):
                mod.set_mask(winograd_mask(mod.weight.detach(), 0.7, method_pattern("bwsp"))[0])
                mod.zero_pruned_()
        return model.eval()
    # DEPrune-BH: depthwise 70%, pointwise filters 30% (the projections that feed a residual add stay: removing
    # their filters is not exact), removed physically
    from lightning_winoprune.callbacks._deprune import is_depthwise, is_pointwise, shrink_pointwise

    names = []
    for mname, mod in model.named_modules():
        if is_depthwise(mod):
            mask = depthwise_mask(mod.weight.detach(), 0.7, "dcp-bh").mask
        elif is_pointwise(mod) and mname.endswith(("conv_pw", "conv_head")):
            mask = pointwise_filter_mask(mod.weight.detach(), 0.3).mask
            names.append(mname)
        else:
            continue
        mod.register_buffer("weight_mask", mask)
        with torch.no_grad():
            mod.weight.mul_(mask)
    shrink_pointwise(model, names, torch.randn(1, 3, 224, 224))
    return model.eval()


def example(batch: int):  # type: ignore[no-untyped-def]
    import torch

    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(2))


# ------------------------------------------------------------------------------------------------ prepare
def prepare(name: str, batch: int, threads: int) -> dict:
    """Build and save the artifacts of one (model, batch): the deployed .pt2 files, the ONNX file, a check."""
    import torch

    import lightning_winoprune as lw

    torch.set_num_threads(threads)
    folder = OUT / f"{name}-b{batch}"
    folder.mkdir(parents=True, exist_ok=True)
    x = example(batch)
    info: dict = {}
    dense, pruned = build(name, False), build(name, True)
    dim = torch.export.Dim("batch", min=1, max=256)
    ex2 = x[:1].expand(2, -1, -1, -1).contiguous()
    for tag, model in (("ours", pruned), ("ours-dense", dense)):
        start = time.perf_counter()
        deployed = lw.deploy(model, x, threads=threads, verbose=False, time_model=False)
        info[f"{tag}_deploy_s"] = time.perf_counter() - start
        info[f"{tag}_max_error"] = deployed.deploy_report.max_error
        info[f"{tag}_routes"] = {r.name: r.route for r in deployed.deploy_report.layers}
        info[f"{tag}_layers"] = [{"name": r.name, "route": r.route, "ms": r.ms, "dense_ms": r.dense_ms,
                                  "shape": r.shape} for r in deployed.deploy_report.layers]
        program = torch.export.export(deployed, (ex2,), dynamic_shapes={"x": {0: dim}})
        torch.export.save(program, folder / f"{tag}.pt2")
        with torch.no_grad():
            loaded = torch.export.load(str(folder / f"{tag}.pt2")).module()
            ref = model(x)
            info[f"{tag}_pt2_error"] = float((loaded(x) - ref).abs().max() / ref.abs().max())
    info["slower_layers"] = [f"{r['name']} {r['ms']:.3f} vs dense {r['dense_ms']:.3f}" for r in info["ours_layers"]
                             if r["ms"] is not None and r["dense_ms"] is not None and r["ms"] > r["dense_ms"] * 1.02]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(dense, (x,), str(folder / "dense.onnx"), dynamo=False, opset_version=17,
                              input_names=["x"], output_names=["y"])
        except Exception as err:
            info["onnx_error"] = f"{type(err).__name__}: {err}"[:300]
    (folder / "info.json").write_text(json.dumps(info, indent=1))
    return info


# ------------------------------------------------------------------------------------------------ workers
def worker(name: str, batch: int, runtime: str, threads: int, repeats: int, warmup: int) -> float | str:
    """Median ms of one runtime, in this process; or a string saying why it cannot run here."""
    folder = OUT / f"{name}-b{batch}"
    x = example(batch)
    if runtime in ("ort", "openvino", "openvino-bf16"):
        if not (folder / "dense.onnx").is_file():
            return "no ONNX file (export failed)"
        import numpy as np

        arr = x.numpy()
        if runtime == "ort":
            try:
                import onnxruntime as ort
            except ImportError:
                return "onnxruntime not installed (pip install 'lightning-winoprune[bench]')"
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            sess = ort.InferenceSession(str(folder / "dense.onnx"), opts, providers=["CPUExecutionProvider"])
            fn = lambda: sess.run(None, {"x": arr})  # noqa: E731
        else:
            try:
                import openvino as ov
            except ImportError:
                return "openvino not installed (pip install 'lightning-winoprune[bench]')"
            core = ov.Core()
            precision = "bf16" if runtime == "openvino-bf16" else "f32"
            compiled = core.compile_model(str(folder / "dense.onnx"), "CPU",
                                          {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                                           "INFERENCE_PRECISION_HINT": precision})
            request = compiled.create_infer_request()
            fn = lambda: request.infer({0: arr})  # noqa: E731
        np.asarray(fn()[0] if runtime == "ort" else next(iter(fn().values())))
    else:
        import torch

        import lightning_winoprune  # noqa: F401  (registers the winoprune:: ops)

        torch.set_num_threads(threads)
        if runtime in ("ours", "ours-dense"):
            model = torch.export.load(str(folder / f"{runtime}.pt2")).module()
        else:
            model = build(name, False)
            if runtime == "jit.freeze":
                with torch.no_grad():
                    model = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model, (x,))))
            elif runtime == "compile":
                import torch._inductor.config as inductor

                inductor.freezing = True
                model = torch.compile(model)
        torch.set_grad_enabled(False)
        fn = lambda: model(x)  # noqa: E731
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def run_worker(args: argparse.Namespace, name: str, batch: int, runtime: str) -> float | str:
    cmd = [sys.executable, __file__, "--worker", runtime, "--models", name, "--batches", str(batch),
           "--threads", str(args.threads), "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        return f"failed: {out.stderr.strip().splitlines()[-1][:200] if out.stderr.strip() else out.returncode}"
    value = json.loads(lines[-1][7:])
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--skip-prepare", action="store_true", help="reuse the artifacts of an earlier run")
    parser.add_argument("--worker", choices=RUNTIMES, help=argparse.SUPPRESS)
    parser.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.models[0], args.batches[0], args.worker, args.threads,
                                            args.repeats, args.warmup)))
        return
    if args.prepare_only:
        print("RESULT " + json.dumps(prepare(args.models[0], args.batches[0], args.threads)))
        return
    import torch

    results: dict = {"torch": torch.__version__, "threads": args.threads, "rounds": args.rounds, "rows": []}
    for name in args.models:
        for batch in args.batches:
            info: dict = {}
            if not args.skip_prepare:
                print(f"[{name} batch {batch}] deploying and exporting ...", flush=True)
                cmd = [sys.executable, __file__, "--prepare-only", "--models", name, "--batches", str(batch),
                       "--threads", str(args.threads)]
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
                if out.returncode != 0:
                    print(out.stderr[-3000:])
                    raise SystemExit(f"prepare failed for {name} batch {batch}")
            info = json.loads((OUT / f"{name}-b{batch}" / "info.json").read_text())
            per: dict[str, list[float]] = {r: [] for r in args.runtimes}
            notes: dict[str, str] = {}
            for rnd in range(args.rounds):
                for runtime in args.runtimes:
                    value = run_worker(args, name, batch, runtime)
                    if isinstance(value, str):
                        notes[runtime] = value
                    else:
                        per[runtime].append(value)
                print(f"[{name} batch {batch}] round {rnd + 1}: " + ", ".join(
                    f"{r} {v[-1]:.2f}" for r, v in per.items() if v), flush=True)
            med = {r: statistics.median(v) for r, v in per.items() if v}
            dense = {r: v for r, v in med.items() if r in DENSE_RUNTIMES}
            best = min(dense, key=dense.__getitem__) if dense else None
            row = {"model": name, "batch": batch, "median_ms": med, "notes": notes,
                   "best_dense": best, "ratio_vs_best_dense": (dense[best] / med["ours"]) if best and "ours" in med
                   else None, "ratio_vs_eager": med["eager"] / med["ours"] if {"eager", "ours"} <= med.keys() else None,
                   "max_error": info.get("ours_pt2_error"), "slower_layers": info.get("slower_layers", [])}
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    cols = [r for r in RUNTIMES if r in args.runtimes]
    print(f"\ntorch {results['torch']}, {args.threads} threads, 224x224, median of {args.rounds} rounds "
          f"(each the median of {args.repeats} runs in its own process)\n")
    print("| model | batch | " + " | ".join(cols) + " | best dense | ours vs best dense |")
    print("|---|---|" + "---|" * len(cols) + "---|---|")
    for row in results["rows"]:
        cells = [f"{row['median_ms'][c]:.1f}" if c in row["median_ms"] else "n/a" for c in cols]
        ratio = row["ratio_vs_best_dense"]
        print(f"| {row['model']} | {row['batch']} | " + " | ".join(cells) +
              f" | {row['best_dense']} | {'-' if ratio is None else f'**{ratio:.2f}x**'} |")
    for row in results["rows"]:
        for runtime, note in row["notes"].items():
            print(f"note: {row['model']} batch {row['batch']} {runtime}: {note}")
        if row["slower_layers"]:
            print(f"note: {row['model']} batch {row['batch']}: layers slower than their dense route: "
                  + "; ".join(row["slower_layers"]))


if __name__ == "__main__":
    main()
