"""Whole-model latency: our deployed pruned model against the best dense deployment a user could pick.

For each timm model (random weights: latency does not depend on their values, only on the masks' structure):

* **ours**: the pruned model through ``lightning_winoprune.deploy`` (BN folded, activations fused, the fastest route
  per layer), saved with ``torch.export`` and loaded back from the ``.pt2``: exactly what a user ships.
  resnet18 / resnet50 / vgg16_bn: every stride-1 3x3 conv but the first (``skip_first``) in the Winograd domain F(2,3),
  BWSP 70%.
  mobilenetv2_100 / efficientnet_b0: DEPrune-BH, depthwise 70%, pointwise filters 30% removed physically
  (torch-pruning).
* the **dense** model on torch eager, ``torch.jit.freeze``, ``torch.compile`` (inductor, freezing), ONNX Runtime and
  OpenVINO (the optional ``bench`` extra; skipped with a note when absent), and through our own ``deploy``. Every
  runtime computes in float32; OpenVINO's bfloat16 default (on CPUs with bfloat16 support) is shown as an extra
  column, not as the baseline, because it changes the model's numerics.
* **ours-bf16** (on CPUs with AVX512-BF16 or AMX): the pruned model through ``deploy(..., precision="bf16")``, every
  layer free to take a bfloat16 route (our Winograd kernels on AMX tiles or AVX512-BF16, oneDNN's bfloat16 convs),
  compared with **openvino-bf16**, the dense model in OpenVINO's bfloat16. bfloat16 is another precision: its
  error against the float32 pruned model and the top-1 agreement are printed beside it.
* where the time goes: **ours-rest** (the shipped ``.pt2`` with the pruned layers' ops replaced by a zero output of
  their shape) and **openvino-rest** (OpenVINO on the dense model with those layers replaced by a stand-in of their
  output shape). Whole model minus rest is the time spent on the pruned layers; ``best dense / ours-rest`` bounds
  what faster pruned kernels alone could reach.

Every torch process first calls ``lightning_winoprune.deploy.keep_freed_memory()`` (``--no-arena``: not), the arena
that ONNX Runtime and OpenVINO have of their own.

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
RUNTIMES = ("ours", "ours-dense", "eager", "jit.freeze", "compile", "ort", "openvino", "openvino-bf16", "ours-bf16",
            "ours-rest", "ours-bf16-rest", "openvino-rest")
#: The float32 dense runtimes: the headline ratio is against the fastest of these. OpenVINO's default on CPUs with
#: bfloat16 support runs in bfloat16 (another precision: relative errors near 1e-2); it is shown, not the baseline.
DENSE_RUNTIMES = ("eager", "jit.freeze", "compile", "ort", "openvino", "ours-dense")
#: where the artifacts and results go (one folder per ISA cap: plans are packed for the ISA they run on)
OUT = Path(__file__).resolve().parent / "results" / ("deploy" + (f"-{os.environ['WINOPRUNE_ISA']}"
                                                                 if os.environ.get("WINOPRUNE_ISA") else ""))
#: The layer kinds of ``deploy``'s report that hold pruned layers, and the ops they run: ``ours-rest`` runs the
#: shipped graph with their compute taken out.
PRUNED_KINDS = ("winograd", "depthwise")
PRUNED_OPS = ("winograd_conv", "winograd_conv_bf16", "depthwise_conv")


# ------------------------------------------------------------------------------------------------ machine
def machine_line() -> str:
    """The CPU this runs on (vendor, ``lscpu`` family/model, name, the ISA extensions that matter here) and the ISA
    our kernels dispatch to (``$WINOPRUNE_ISA`` caps it: ``--isa``)."""
    from lightning_winoprune.kernels import native_isa

    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
            if not line.strip():
                break
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    exts = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return (f"CPU: {fields.get('vendor_id', '?')} family {fields.get('cpu family', '?')} model "
            f"{fields.get('model', '?')} ({fields.get('model name', '?')}), {os.cpu_count()} cores; "
            f"{' '.join(exts) or 'no AVX2'}; our kernels dispatch to {native_isa() or 'none (extension not loaded)'}")


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
    from lightning_winoprune._utils import is_depthwise, is_pointwise
    from lightning_winoprune.pruning._shrink import shrink_pointwise

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
def prepare(name: str, batch: int, threads: int, arena: bool = True) -> dict:
    """Build and save the artifacts of one (model, batch): the deployed .pt2 files, the ONNX file, a check."""
    import torch

    import lightning_winoprune as lw
    from lightning_winoprune.deploy import keep_freed_memory

    if arena:
        keep_freed_memory()  # where routes are tuned: as in the processes that time them
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
        info[f"{tag}_layers"] = [{"name": r.name, "kind": r.kind, "route": r.route, "ms": r.ms,
                                  "dense_ms": r.dense_ms, "shape": r.shape} for r in deployed.deploy_report.layers]
        program = torch.export.export(deployed, (ex2,), dynamic_shapes={"x": {0: dim}})
        torch.export.save(program, folder / f"{tag}.pt2")
        with torch.no_grad():
            loaded = torch.export.load(str(folder / f"{tag}.pt2")).module()
            ref = model(x)
            info[f"{tag}_pt2_error"] = float((loaded(x) - ref).abs().max() / ref.abs().max())
    _prepare_bf16(pruned, x, ex2, dim, threads, folder, info)
    info["slower_layers"] = [f"{r['name']} {r['ms']:.3f} vs dense {r['dense_ms']:.3f}" for r in info["ours_layers"]
                             if r["ms"] is not None and r["dense_ms"] is not None and r["ms"] > r["dense_ms"] * 1.02]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(dense, (x,), str(folder / "dense.onnx"), dynamo=False, opset_version=17,
                              input_names=["x"], output_names=["y"])
        except Exception as err:
            info["onnx_error"] = f"{type(err).__name__}: {err}"[:300]
        pruned_names = [r["name"] for r in info["ours_layers"] if r["kind"] in PRUNED_KINDS]
        try:
            torch.onnx.export(without_pruned_layers(build(name, False), pruned_names), (x,),
                              str(folder / "dense-rest.onnx"), dynamo=False, opset_version=17, input_names=["x"],
                              output_names=["y"])
        except Exception as err:
            info["onnx_rest_error"] = f"{type(err).__name__}: {err}"[:300]
    (folder / "info.json").write_text(json.dumps(info, indent=1))
    return info


def _prepare_bf16(pruned, x, ex2, dim, threads: int, folder: Path, info: dict) -> None:  # type: ignore[no-untyped-def]
    """``ours-bf16.pt2``: the pruned model deployed with ``precision="bf16"`` (where this CPU has bfloat16 kernels)."""
    import torch

    import lightning_winoprune as lw
    from lightning_winoprune.deploy._packed_bf16 import bf16_refusal

    refusal = bf16_refusal()
    if refusal is not None:
        info["ours_bf16_skipped"] = refusal
        return
    deployed = lw.deploy(pruned, x, threads=threads, verbose=False, time_model=False, precision="bf16")
    report = deployed.deploy_report
    info["ours-bf16_max_error"] = report.max_error
    info["ours-bf16_layers"] = [{"name": r.name, "kind": r.kind, "route": r.route, "ms": r.ms,
                                 "dense_ms": r.dense_ms, "shape": r.shape} for r in report.layers]
    program = torch.export.export(deployed, (ex2,), dynamic_shapes={"x": {0: dim}})
    torch.export.save(program, folder / "ours-bf16.pt2")
    with torch.no_grad():
        loaded = torch.export.load(str(folder / "ours-bf16.pt2")).module()
        ref, out = pruned(x), loaded(x)
        info["ours-bf16_pt2_error"] = float((out - ref).abs().max() / ref.abs().max())
        info["ours-bf16_top1_agreement"] = float((out.argmax(1) == ref.argmax(1)).float().mean())


# ------------------------------------------------------------------------------------------------ workers
def without_pruned_compute(graph_module, pruned: set[str]):  # type: ignore[no-untyped-def]
    """``graph_module`` (a loaded ``.pt2``) with the op of every layer named in ``pruned`` replaced by a zero output
    of its shape (an unpruned conv on our dense Winograd route keeps its op).

    What is left is the time of everything the pruned layers do not cover (the unpruned convs, pooling, residual
    adds, the head) plus writing the pruned layers' outputs: the time the deployed model would take if our kernels
    took none, so ``best dense / ours-rest`` bounds the ratio that faster pruned kernels alone could reach.
    """
    import torch

    targets = {getattr(torch.ops.winoprune, op).default for op in PRUNED_OPS}
    swapped = 0
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or node.target not in targets:
            continue
        plan = node.args[1]  # the layer's plan_meta buffer: "<layer>.plan_meta" ("inner.<layer>" in a bfloat16 model)
        layer = str(getattr(plan, "target", "")).rsplit(".", 1)[0]
        if getattr(plan, "op", None) == "get_attr" and (layer in pruned or layer.removeprefix("inner.") in pruned):
            node.target = _zero_output(node.target)
            swapped += 1
    if not swapped:  # a pruned layer that deploy put on a dense route stays: it is part of the rest
        raise SystemExit(f"ours-rest: none of the {len(pruned)} pruned layers runs our kernels in the graph")
    graph_module.recompile()
    return graph_module


def without_pruned_layers(model, names: list[str]):  # type: ignore[no-untyped-def]
    """The dense ``model`` with the convs named in ``names`` replaced by the cheapest op of the same output shape.

    The stand-in subsamples by the conv's stride and repeats or drops channels: about the cost of writing the conv's
    output. OpenVINO's time on this model (``openvino-rest``), subtracted from its time on the whole dense model, is
    what the best dense runtime spends on the layers we prune.
    """
    import torch

    class StandIn(torch.nn.Module):
        def __init__(self, conv: torch.nn.Conv2d) -> None:
            super().__init__()
            self.cin, self.cout, self.stride = conv.in_channels, conv.out_channels, tuple(conv.stride)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.stride != (1, 1):
                x = x[:, :, :: self.stride[0], :: self.stride[1]]
            if self.cout > self.cin:
                x = x.repeat(1, -(-self.cout // self.cin), 1, 1)
            return x[:, : self.cout] if x.shape[1] != self.cout else x

    for name in names:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, StandIn(model.get_submodule(name)))
    return model


def _zero_output(op):  # type: ignore[no-untyped-def]
    """A stand-in for ``op`` that returns zeros of its output's shape, dtype and layout (found by running ``op`` once
    per input shape and dtype: a bfloat16 model's layers return bfloat16 channels-last)."""
    import torch

    outs: dict = {}

    def free(x, *args):  # type: ignore[no-untyped-def]
        key = (tuple(x.shape), x.dtype)
        if key not in outs:
            outs[key] = op(x, *args)
        return torch.zeros_like(outs[key])

    return free


def worker(name: str, batch: int, runtime: str, threads: int, repeats: int, warmup: int,
           arena: bool = True) -> float | str:
    """Median ms of one runtime, in this process; or a string saying why it cannot run here."""
    folder = OUT / f"{name}-b{batch}"
    x = example(batch)
    if runtime in ("ort", "openvino", "openvino-bf16", "openvino-rest"):
        onnx_file = folder / ("dense-rest.onnx" if runtime == "openvino-rest" else "dense.onnx")
        if not onnx_file.is_file():
            return f"no {onnx_file.name} (export failed)"
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
            sess = ort.InferenceSession(str(onnx_file), opts, providers=["CPUExecutionProvider"])
            fn = lambda: sess.run(None, {"x": arr})  # noqa: E731
        else:
            try:
                import openvino as ov
            except ImportError:
                return "openvino not installed (pip install 'lightning-winoprune[bench]')"
            core = ov.Core()
            precision = "bf16" if runtime == "openvino-bf16" else "f32"  # -rest: f32, like openvino
            compiled = core.compile_model(str(onnx_file), "CPU",
                                          {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                                           "INFERENCE_PRECISION_HINT": precision})
            request = compiled.create_infer_request()
            fn = lambda: request.infer({0: arr})  # noqa: E731
        np.asarray(fn()[0] if runtime == "ort" else next(iter(fn().values())))
    else:
        import torch

        from lightning_winoprune.deploy import keep_freed_memory  # (and registers the winoprune:: ops)

        if arena:
            keep_freed_memory()
        torch.set_num_threads(threads)
        if runtime in ("ours", "ours-dense", "ours-rest", "ours-bf16", "ours-bf16-rest"):
            artifact = folder / f"{runtime.replace('-rest', '')}.pt2"
            if not artifact.is_file():
                info = json.loads((folder / "info.json").read_text())
                return info.get("ours_bf16_skipped", f"no {artifact.name}")
            model = torch.export.load(str(artifact)).module()
            if runtime.endswith("-rest"):
                info = json.loads((folder / "info.json").read_text())
                layers = info["ours-bf16_layers" if runtime == "ours-bf16-rest" else "ours_layers"]
                model = without_pruned_compute(model, {r["name"] for r in layers if r.get("kind") in PRUNED_KINDS})
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
    return time_calls(fn, warmup, repeats)


def time_calls(fn, warmup: int, repeats: int) -> float:  # type: ignore[no-untyped-def]
    """Median milliseconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def run_worker(args: argparse.Namespace, name: str, batch: int, runtime: str, script: str = __file__) -> float | str:
    """One runtime timed in a process of its own (``script --worker``): its median ms, or why it could not run."""
    cmd = [sys.executable, script, "--worker", runtime, "--models", name, "--batches", str(batch),
           "--threads", str(args.threads), "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    cmd += ["--no-arena"] if getattr(args, "no_arena", False) else []
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
    parser.add_argument("--isa", choices=("avx512", "avx2", "generic"),
                        help="cap the ISA our kernels dispatch to (sets $WINOPRUNE_ISA for every process): "
                             "measures the AVX2 path on an AVX-512 machine")
    parser.add_argument("--no-arena", action="store_true",
                        help="leave glibc's malloc as it is (by default every torch process calls "
                             "lightning_winoprune.deploy.keep_freed_memory: no page faults on large activations)")
    parser.add_argument("--worker", choices=RUNTIMES, help=argparse.SUPPRESS)
    parser.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.isa and not args.worker and not args.prepare_only:
        global OUT
        os.environ["WINOPRUNE_ISA"] = args.isa  # before the extension loads; inherited by every process
        OUT = OUT.parent / f"deploy-{args.isa}"
    if args.worker:
        print("RESULT " + json.dumps(worker(args.models[0], args.batches[0], args.worker, args.threads,
                                            args.repeats, args.warmup, not args.no_arena)))
        return
    if args.prepare_only:
        print("RESULT " + json.dumps(prepare(args.models[0], args.batches[0], args.threads, not args.no_arena)))
        return
    import torch

    print(machine_line(), flush=True)
    results: dict = {"machine": machine_line(), "torch": torch.__version__, "threads": args.threads,
                     "rounds": args.rounds,
                     "keep_freed_memory": not args.no_arena, "rows": []}
    for name in args.models:
        for batch in args.batches:
            info: dict = {}
            if not args.skip_prepare:
                print(f"[{name} batch {batch}] deploying and exporting ...", flush=True)
                cmd = [sys.executable, __file__, "--prepare-only", "--models", name, "--batches", str(batch),
                       "--threads", str(args.threads)] + (["--no-arena"] if args.no_arena else [])
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
                   "bound_vs_best_dense": (dense[best] / med["ours-rest"]) if best and "ours-rest" in med else None,
                   # time on the pruned layers: the whole model minus the model without them
                   "pruned_layers_ms": {r: med[r] - med[f"{r}-rest"] for r in ("ours", "ours-bf16", "openvino")
                                        if {r, f"{r}-rest"} <= med.keys()},
                   "max_error": info.get("ours_pt2_error"), "slower_layers": info.get("slower_layers", []),
                   "bf16_ratio_vs_openvino_bf16": (med["openvino-bf16"] / med["ours-bf16"])
                   if {"openvino-bf16", "ours-bf16"} <= med.keys() else None,
                   "bf16_max_error": info.get("ours-bf16_pt2_error"),
                   "bf16_top1_agreement": info.get("ours-bf16_top1_agreement")}
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    cols = [r for r in RUNTIMES if r in args.runtimes]
    print(f"\n{results['machine']}\ntorch {results['torch']}, {args.threads} threads, 224x224, median of "
          f"{args.rounds} rounds "
          f"(each the median of {args.repeats} runs in its own process), torch processes "
          + ("with keep_freed_memory()" if not args.no_arena else "with glibc's default malloc") + "\n")
    print("| model | batch | " + " | ".join(cols) + " | best dense | ours vs best dense | bound (ours-rest) |")
    print("|---|---|" + "---|" * len(cols) + "---|---|---|")
    for row in results["rows"]:
        cells = [f"{row['median_ms'][c]:.1f}" if c in row["median_ms"] else "n/a" for c in cols]
        ratio, bound = row["ratio_vs_best_dense"], row["bound_vs_best_dense"]
        print(f"| {row['model']} | {row['batch']} | " + " | ".join(cells) +
              f" | {row['best_dense']} | {'-' if ratio is None else f'**{ratio:.2f}x**'} | "
              f"{'-' if bound is None else f'{bound:.2f}x'} |")
    print("\nbound: best dense / ours-rest, the ratio if the pruned layers' kernels took no time at all")
    for row in results["rows"]:
        if row["bf16_ratio_vs_openvino_bf16"] is not None:
            print(f"{row['model']} batch {row['batch']}: bfloat16: ours-bf16 vs openvino-bf16 "
                  f"**{row['bf16_ratio_vs_openvino_bf16']:.2f}x**; ours-bf16 against the float32 pruned model: "
                  f"relative max error {row['bf16_max_error']:.1e}, top-1 agreement "
                  f"{row['bf16_top1_agreement']:.0%} (batch {row['batch']}, random weights)")
    for row in results["rows"]:
        if row["pruned_layers_ms"]:
            print(f"{row['model']} batch {row['batch']}: time on the pruned layers (whole model minus the model "
                  "without them): " + ", ".join(f"{r} {v:.1f} ms" for r, v in row["pruned_layers_ms"].items()))
    for row in results["rows"]:
        for runtime, note in row["notes"].items():
            print(f"note: {row['model']} batch {row['batch']} {runtime}: {note}")
        if row["slower_layers"]:
            print(f"note: {row['model']} batch {row['batch']}: layers slower than their dense route: "
                  + "; ".join(row["slower_layers"]))


if __name__ == "__main__":
    main()
