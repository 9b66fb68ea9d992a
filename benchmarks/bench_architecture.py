"""Which architecture runs the unpruned rest of a deployed model fastest: the measurement behind docs/architecture.md.

The pruned layers are our kernels either way. What differs between the two candidate designs is who runs the rest
of the network (the stem, stride-2 and 1x1 convs, pooling, residual adds, the head) and what it costs to hand a
tensor to our kernels and back:

* **(a) everything in torch**: the deployed module chains torch ops and our ``winoprune::`` ops. Today every op reads
  and writes NCHW (**ours-rest**). One layout end to end with oneDNN's fused adds is what inductor builds from the
  same graph (channels-last, prepacked weights, conv + add + activation in one oneDNN primitive):
  **compile-rest** is torch.compile (inductor, freezing) on the dense model with the pruned convs replaced by a
  stand-in, the rest that candidate (a) can reach with torch's own machinery; **compile-cpp-rest** the same with
  inductor's C++ wrapper (no Python between the ops, as AOTInductor would run it).
* **(b) OpenVINO runs the rest**: our pruned layers become an OpenVINO extension op. **openvino-ext-rest** is
  OpenVINO on the dense model with the pruned convs replaced by a foreign op (``WinogradStub``, built from
  ``benchmarks/ov_stub/`` against the openvino wheel; it writes a zero output of the layer's shape, the fused
  activation folded in): the rest plus everything OpenVINO does around a foreign op (leaving its blocked layout,
  the reference-node dispatch, coming back). **openvino-rest** is the same model with a cheap native stand-in
  instead (no foreign op): the difference between the two is what the hand-over costs.

Beside them: **openvino** (the dense model, float32), and **ours** (the shipped ``.pt2``). The pruned layers cost
about ``ours - ours-rest`` on our kernels in either design, so (a) ships about ``compile-rest + (ours - ours-rest)``
and (b) about ``openvino-ext-rest + (ours - ours-rest)`` (less, if an extension op fuses what follows it).

Every (model, runtime) runs in its own process, the runtimes take turns over the rounds, medians of medians. It uses
the artifacts of ``bench_deploy.py`` (made here with its ``--prepare-only`` step when missing).

``--section layers`` times the unpruned convs of the deployed model alone (warm caches, one torch process, the
candidates interleaved): our NCHW routes (``eager``: ``F.conv2d`` + activation; ``onednn``: our ``conv2d_act``;
``gemm``: our ``conv1x1_act``) against oneDNN on a channels-last input with a prepacked weight and the activation as
a post-op, the dense route of (a)::

    pip install -e ".[bench]"
    python benchmarks/bench_architecture.py --models resnet18 mobilenetv2_100 --rounds 3
    python benchmarks/bench_architecture.py --section layers --models resnet18
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

import bench_deploy as bd

RUNTIMES = ("ours", "ours-rest", "compile-rest", "compile-cpp-rest", "openvino", "openvino-rest",
            "openvino-ext-rest")
HERE = Path(__file__).resolve().parent
STUB_SRC = HERE / "ov_stub"
STUB_BUILD = bd.OUT.parent / "ov_stub-build"
#: activations that follow a pruned conv and that our kernels fuse: the stand-in op takes them over
_FOLDED = ("Relu", "Clip")


def stub_library() -> Path:
    """The ``WinogradStub`` extension, built once with CMake against the installed openvino wheel."""
    import openvino

    lib = STUB_BUILD / "libwinoprune_ov_stub.so"
    if lib.is_file():
        return lib
    STUB_BUILD.mkdir(parents=True, exist_ok=True)
    ov_cmake = Path(openvino.__file__).parent / "cmake"
    for cmd in (["cmake", str(STUB_SRC), f"-DOpenVINO_DIR={ov_cmake}", "-DCMAKE_BUILD_TYPE=Release"],
                ["cmake", "--build", ".", "-j", "2"]):
        out = subprocess.run(cmd, cwd=STUB_BUILD, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"building the OpenVINO stand-in extension failed:\n{out.stdout[-2000:]}{out.stderr}")
    return lib


def onnx_node_name(module_name: str) -> str:
    """The node name torch's ONNX exporter gives a conv module: ``layer2.0.downsample.0`` -> ``/layer2/layer2.0/
    downsample/downsample.0/Conv``, ``blocks.1.0.conv_dw`` -> ``/blocks/blocks.1/blocks.1.0/conv_dw/Conv`` (an index
    is named with the path from its nearest named ancestor)."""
    parts, scopes, named = module_name.split("."), [], 0
    for i, part in enumerate(parts):
        if not part.isdigit():
            named = i
        scopes.append(".".join(parts[named : i + 1]))
    return "/" + "/".join(scopes) + "/Conv"


def with_foreign_ops(src: Path, dst: Path, names: list[str]) -> int:
    """``src`` (the dense ONNX model) with the convs named in ``names`` replaced by ``winoprune.WinogradStub``.

    A Relu or Clip that is the conv's only consumer is folded into the stand-in (our kernels fuse it). Returns how
    many convs were replaced.
    """
    import onnx
    from onnx import helper

    model = onnx.load(str(src))
    graph = model.graph
    wanted = {onnx_node_name(n) for n in names}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for inp in node.input:
            consumers.setdefault(inp, []).append(node)
    replaced, drop = 0, []
    for idx, node in enumerate(list(graph.node)):
        if node.op_type != "Conv" or node.name not in wanted:
            continue
        stride = next((list(a.ints) for a in node.attribute if a.name == "strides"), [1, 1])[0]
        out = node.output[0]
        users = consumers.get(out, [])
        if len(users) == 1 and users[0].op_type in _FOLDED:
            out = users[0].output[0]
            drop.append(users[0])
        stub = helper.make_node("WinogradStub", [node.input[0], node.input[1]], [out], name=node.name + "Stub",
                                domain="winoprune", stride=int(stride))
        graph.node.remove(node)
        graph.node.insert(idx, stub)
        replaced += 1
    for node in drop:
        graph.node.remove(node)
    model.opset_import.append(helper.make_opsetid("winoprune", 1))
    onnx.save(model, str(dst))
    return replaced


def prepare(name: str, batch: int, threads: int) -> dict:
    """bench_deploy's artifacts for (name, batch), plus the ONNX model with foreign ops."""
    folder = bd.OUT / f"{name}-b{batch}"
    if not (folder / "info.json").is_file():
        cmd = [sys.executable, str(HERE / "bench_deploy.py"), "--prepare-only", "--models", name, "--batches",
               str(batch), "--threads", str(threads)]
        print(f"[{name} batch {batch}] deploying and exporting (bench_deploy.py --prepare-only) ...", flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if out.returncode != 0:
            raise SystemExit(f"prepare failed for {name} batch {batch}:\n{out.stderr[-3000:]}")
    info = json.loads((folder / "info.json").read_text())
    pruned = [r["name"] for r in info["ours_layers"] if r["kind"] in bd.PRUNED_KINDS]
    count = with_foreign_ops(folder / "dense.onnx", folder / "dense-ext.onnx", pruned)
    if count != len(pruned):
        raise SystemExit(f"{name}: replaced {count} of {len(pruned)} pruned convs in the ONNX graph")
    return {"pruned": pruned}


def _compile_rest(name: str, pruned: list[str], cpp: bool):  # type: ignore[no-untyped-def]
    import torch
    import torch._inductor.config as inductor

    inductor.freezing = True
    inductor.cpp_wrapper = cpp
    model = bd.without_pruned_layers(bd.build(name, False), pruned)
    return torch.compile(model)


def _openvino(onnx_file: Path, threads: int, extension: Path | None):  # type: ignore[no-untyped-def]
    import openvino as ov

    core = ov.Core()
    if extension is not None:
        core.add_extension(str(extension))
    compiled = core.compile_model(str(onnx_file), "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                          "PERFORMANCE_HINT": "LATENCY",
                                                          "INFERENCE_PRECISION_HINT": "f32"})
    return compiled.create_infer_request()


def worker(name: str, batch: int, runtime: str, threads: int, repeats: int, warmup: int) -> float | str:
    """Median ms of one runtime, in this process."""
    if runtime in ("ours", "ours-rest", "openvino", "openvino-rest"):
        return bd.worker(name, batch, runtime, threads, repeats, warmup)
    folder = bd.OUT / f"{name}-b{batch}"
    x = bd.example(batch)
    if runtime == "openvino-ext-rest":
        try:
            request = _openvino(folder / "dense-ext.onnx", threads, stub_library())
        except ImportError:
            return "openvino not installed (pip install 'lightning-winoprune[bench]')"
        arr = x.numpy()
        fn = lambda: request.infer({0: arr})  # noqa: E731
    else:
        import torch

        from lightning_winoprune.deploy import keep_freed_memory

        keep_freed_memory()
        torch.set_num_threads(threads)
        torch.set_grad_enabled(False)
        info = json.loads((folder / "info.json").read_text())
        pruned = [r["name"] for r in info["ours_layers"] if r["kind"] in bd.PRUNED_KINDS]
        model = _compile_rest(name, pruned, cpp=runtime == "compile-cpp-rest")
        fn = lambda: model(x)  # noqa: E731
    return bd.time_calls(fn, warmup, repeats)


def summarize(name: str, batch: int, med: dict[str, float]) -> dict:
    """The two designs' estimated whole-model times and the hand-over cost of (b)."""
    row: dict = {"model": name, "batch": batch, "median_ms": med}
    if {"ours", "ours-rest"} <= med.keys():
        kernels = med["ours"] - med["ours-rest"]
        row["pruned_layers_ms"] = kernels
        if "compile-rest" in med:
            row["a_estimate_ms"] = med["compile-rest"] + kernels
        if "openvino-ext-rest" in med:
            row["b_estimate_ms"] = med["openvino-ext-rest"] + kernels
    if {"openvino-ext-rest", "openvino-rest"} <= med.keys():
        row["b_handover_ms"] = med["openvino-ext-rest"] - med["openvino-rest"]
    return row


def _conv_specs(name: str, batch: int) -> list[dict]:
    """The unpruned convs of bench_deploy's deployed ``name`` (kind ``conv``): name, weight shape, stride, padding,
    fused activation and input shape, read off the model itself."""
    import torch

    from lightning_winoprune.deploy._record import record

    info = json.loads((bd.OUT / f"{name}-b{batch}" / "info.json").read_text())
    wanted = {r["name"] for r in info["ours_layers"] if r["kind"] == "conv"}
    chains, _ = record(bd.build(name, True), bd.example(batch))  # the pruned model: its 1x1 convs are shrunk
    specs = []
    for chain in chains:
        conv = chain.conv
        if chain.name in wanted and isinstance(conv, torch.nn.Conv2d) and conv.groups == 1:
            specs.append({"name": chain.name, "x": chain.x, "weight": conv.weight.detach(), "stride": conv.stride[0],
                          "padding": conv.padding[0], "relu": chain.act.value != "none"})
    return specs


def _eager(y, act: int):  # type: ignore[no-untyped-def]
    return y.relu_() if act else y


def layers(name: str, batch: int, threads: int, repeats: int) -> list[dict]:
    """Each unpruned conv of ``name`` on our NCHW routes and on channels-last oneDNN (medians, interleaved)."""
    import torch
    import torch.nn.functional as F

    from lightning_winoprune._utils import median_ms
    from lightning_winoprune.deploy import keep_freed_memory

    keep_freed_memory()
    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    rows = []
    for spec in _conv_specs(name, batch):
        x, w, s, p = spec["x"], spec["weight"], spec["stride"], spec["padding"]
        b, act = torch.randn(w.shape[0]), 1 if spec["relu"] else 0
        x_cl = x.contiguous(memory_format=torch.channels_last)
        packed = torch.ops.mkldnn._reorder_convolution_weight(w, [p, p], [s, s], [1, 1], 1, list(x.shape))
        fns = {
            "eager": lambda x=x, w=w, b=b, s=s, p=p, act=act: _eager(F.conv2d(x, w, b, s, p), act),
            "onednn": lambda x=x, w=w, b=b, s=s, p=p, act=act: torch.ops.winoprune.conv2d_act(x, w, b, s, s, p, p, 1,
                                                                                              act),
            "nhwc-onednn": lambda x=x_cl, w=packed, b=b, s=s, p=p, act=act: torch.ops.mkldnn._convolution_pointwise(
                x, w, b, [p, p], [s, s], [1, 1], 1, "relu" if act else "none", [], ""),
        }
        if w.shape[2:] == (1, 1) and s == 1 and p == 0:  # our matrix-product route for 1x1 convs
            fns["gemm"] = lambda x=x, w=w, b=b, act=act: torch.ops.winoprune.conv1x1_act(x, w, b, act)
        ref = fns["eager"]()
        out = fns["nhwc-onednn"]()
        if not out.is_contiguous(memory_format=torch.channels_last) or not torch.allclose(out, ref, rtol=1e-3,
                                                                                            atol=1e-3):
            raise SystemExit(f"{spec['name']}: the channels-last oneDNN conv does not match F.conv2d")
        ms = median_ms(fns, repeats, warmup=3)
        rows.append({"name": spec["name"], "shape": f"{w.shape[1]}->{w.shape[0]} {x.shape[2]}x{x.shape[3]} "
                     f"k{w.shape[2]} s{s}", **ms, "best_nchw": min(v for k, v in ms.items() if k != "nhwc-onednn")})
        print(f"  {rows[-1]['name']:24s} {rows[-1]['shape']:24s} " + "  ".join(f"{k} {v:.3f}" for k, v in ms.items()),
              flush=True)
    return rows


def main_layers(args: argparse.Namespace) -> None:
    """``--section layers``: the table of the unpruned convs, per model."""
    print(bd.machine_line(), flush=True)
    for name in args.models:
        for batch in args.batches:
            prepare(name, batch, args.threads)
            print(f"[{name} batch {batch}] unpruned convs, median ms of {args.repeats * 4} interleaved runs")
            rows = layers(name, batch, args.threads, args.repeats * 4)
            nchw, nhwc = sum(r["best_nchw"] for r in rows), sum(r["nhwc-onednn"] for r in rows)
            print(f"[{name} batch {batch}] {len(rows)} convs: best NCHW route {nchw:.3f} ms, channels-last oneDNN "
                  f"{nhwc:.3f} ms ({nchw / nhwc:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenetv2_100"], choices=bd.MODELS)
    parser.add_argument("--batches", nargs="+", type=int, default=[1])
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--section", choices=("runtimes", "layers"), default="runtimes")
    parser.add_argument("--worker", choices=RUNTIMES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.section == "layers":
        main_layers(args)
        return
    if args.worker:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = worker(args.models[0], args.batches[0], args.worker, args.threads, args.repeats, args.warmup)
        print("RESULT " + json.dumps(value))
        return
    if shutil.which("cmake") is None:
        raise SystemExit("cmake is needed to build the OpenVINO stand-in extension")
    print(bd.machine_line(), flush=True)
    rows = []
    for name in args.models:
        for batch in args.batches:
            prepare(name, batch, args.threads)
            per: dict[str, list[float]] = {r: [] for r in args.runtimes}
            for rnd in range(args.rounds):
                for runtime in args.runtimes:
                    value = bd.run_worker(args, name, batch, runtime, __file__)
                    if isinstance(value, str):
                        print(f"  {runtime}: {value}")
                    else:
                        per[runtime].append(value)
                print(f"[{name} batch {batch}] round {rnd + 1}: " + ", ".join(
                    f"{r} {v[-1]:.2f}" for r, v in per.items() if v), flush=True)
            rows.append(summarize(name, batch, {r: statistics.median(v) for r, v in per.items() if v}))
            print(json.dumps(rows[-1]), flush=True)
    bd.OUT.mkdir(parents=True, exist_ok=True)
    (bd.OUT / "architecture.json").write_text(json.dumps({"machine": bd.machine_line(), "rows": rows}, indent=1))
    print("\n| model | batch | " + " | ".join(args.runtimes) + " | (a) est. | (b) est. | (b) hand-over |")
    print("|---|---|" + "---|" * (len(args.runtimes) + 3))
    for row in rows:
        cells = [f"{row['median_ms'][r]:.2f}" if r in row["median_ms"] else "n/a" for r in args.runtimes]
        extra = [f"{row[k]:.2f}" if k in row else "n/a" for k in ("a_estimate_ms", "b_estimate_ms", "b_handover_ms")]
        print(f"| {row['model']} | {row['batch']} | " + " | ".join(cells + extra) + " |")


if __name__ == "__main__":
    main()
