"""Dynamic shapes and the ``.pt2`` artifact: ``deploy(dynamic=...)``, then export, save and load the model."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import timm
import torch
from deploy_helpers import prune, randomize_bn, rel_error
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_winoprune import WinogradConv2d, winogradize
from lightning_winoprune.deploy import (
    DeployArtifactError,
    DeployShapes,
    deploy,
    export_deployed,
    load_deployed,
    save_deployed,
)
from lightning_winoprune.deploy._artifact import ARTIFACT_FORMAT
from lightning_winoprune.kernels import native_available

needs_ext = pytest.mark.skipif(not native_available(), reason="the native extension is not loaded")
FAST = {"tune": False, "verbose": False, "time_model": False}


def vgg() -> nn.Module:
    """VGG-style: 3x3 convs (one WinogradConv2d), three 2x2 max pools (so 8x8 is the smallest input), a 1x1 conv."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                          WinogradConv2d(8, 16, m=2), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 16, 1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    return randomize_bn(prune(model), 2).eval()


@pytest.fixture(scope="module")
def vgg_model() -> nn.Module:
    return vgg()


@pytest.fixture(scope="module")
def vgg_deployed(vgg_model) -> dict[str, nn.Module]:
    """The VGG-style model deployed at batch 2, 17x15, with each dynamic choice."""
    x = torch.randn(2, 3, 17, 15, generator=torch.Generator().manual_seed(0))
    return {dyn: deploy(vgg_model, x, dynamic=dyn, **FAST) for dyn in ("batch", "none", "batch+hw", "hw")}


@pytest.fixture(scope="module")
def saved(vgg_deployed, tmp_path_factory) -> Path:
    """A good .pt2 (dynamic batch, H and W) of the VGG-style model."""
    return save_deployed(vgg_deployed["batch+hw"], tmp_path_factory.mktemp("saved") / "vgg.pt2")


# --------------------------------------------------------------------------------------------- dynamic choices
def test_a_bad_dynamic_value_is_refused(vgg_model):
    x = torch.randn(1, 3, 16, 16)
    for bad in ("batch+w", "HW", None, 1):
        with pytest.raises(ValueError, match=r"dynamic must be one of 'batch', 'none', 'batch\+hw', 'hw', got "
                                             + re.escape(repr(bad))):
            deploy(vgg_model, x, dynamic=bad, **FAST)  # type: ignore[arg-type]


def test_the_choice_and_shapes_are_stored_and_survive_deepcopy(vgg_deployed):
    shapes = vgg_deployed["batch+hw"].deploy_shapes
    assert shapes == DeployShapes("batch+hw", (2, 3, 17, 15), (8, 8), (4096, 4096), 4096)
    assert copy.deepcopy(vgg_deployed["batch+hw"]).deploy_shapes == shapes
    assert vgg_deployed["batch"].deploy_shapes == DeployShapes("batch", (2, 3, 17, 15), (17, 15), (17, 15), 4096)
    assert vgg_deployed["none"].deploy_shapes == DeployShapes("none", (2, 3, 17, 15), (17, 15), (17, 15), 2)
    assert vgg_deployed["hw"].deploy_shapes.max_batch == 2
    assert DeployShapes.from_dict(shapes.to_dict()) == shapes
    note = next(n for n in vgg_deployed["hw"].deploy_report.notes if n.startswith("dynamic="))
    assert "from 8x8 to 4096x4096" in note and "checked at 8x8" in note and "25x23" in note


#: (batch, H, W) each choice must run at (the tuned shape is batch 2, 17x15)
SIZES = {"batch": [(1, 17, 15), (2, 17, 15), (5, 17, 15)], "none": [(2, 17, 15)],
         "batch+hw": [(1, 8, 8), (5, 17, 15), (1, 9, 31), (3, 33, 21)], "hw": [(2, 8, 8), (2, 13, 27), (2, 40, 9)]}
#: an input each choice must refuse, and what the one-line guard error names
REFUSED = {"batch": ((2, 16, 15), r"size\(\)\[2\] == 17"), "none": ((1, 17, 15), r"size\(\)\[0\] == 2"),
           "batch+hw": ((1, 7, 15), r"size\(\)\[2\] >= 8"), "hw": ((3, 17, 15), r"size\(\)\[0\] == 2")}


@needs_ext
@pytest.mark.parametrize("dynamic", ["batch", "none", "batch+hw", "hw"])
def test_every_choice_exports_and_runs_at_its_sizes(vgg_model, vgg_deployed, dynamic):
    deployed = vgg_deployed[dynamic]
    module = export_deployed(deployed).module()
    for n, h, w in SIZES[dynamic]:
        x = torch.randn(n, 3, h, w)
        assert rel_error(module(x), vgg_model(x)) <= 1e-4, (n, h, w)
        assert rel_error(deployed(x), vgg_model(x)) <= 1e-4, (n, h, w)
    (n, h, w), guard = REFUSED[dynamic]
    with pytest.raises(AssertionError, match=r"^Guard failed: \w+\." + guard) as info:
        module(torch.randn(n, 3, h, w))
    assert "\n" not in str(info.value)  # torch's own guard error is one line naming the exported size or bound


@needs_ext
@pytest.mark.parametrize(("name", "shape"), [("resnet18", (2, 1, 20, 20)), ("mobilenetv2_100", (1, 1, 32, 32))])
def test_timm_models_export_with_a_dynamic_height_and_width(name, shape):
    model = timm.create_model(name, num_classes=10, in_chans=1)
    if name == "resnet18":
        winogradize(model, m=2)
    model = randomize_bn(prune(model), 1).eval()
    deployed = deploy(model, torch.randn(*shape), dynamic="batch+hw", **FAST)
    assert deployed.deploy_shapes.min_hw == (1, 1)  # every conv and pool is padded: even 1x1 gives a 1x1 map
    module = export_deployed(deployed).module()
    for n, h, w in [(1, 1, 1), (5, 20, 20), (1, 37, 29), (2, 64, 48)]:
        x = torch.randn(n, 1, h, w)
        with torch.no_grad():
            assert rel_error(module(x), model(x)) <= 1e-4, (n, h, w)


@needs_ext
@settings(max_examples=12)
@given(n=st.integers(1, 5), h=st.integers(1, 40), w=st.integers(1, 40))
def test_the_exported_program_matches_the_model_anywhere_in_range(vgg_program, vgg_model, n, h, w):
    assume(h >= 8 and w >= 8)
    x = torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(n * 1681 + h * 41 + w))
    assert rel_error(vgg_program(x), vgg_model(x)) <= 1e-4


@pytest.fixture(scope="module")
def vgg_program(vgg_deployed) -> nn.Module:
    return export_deployed(vgg_deployed["batch+hw"]).module()


@needs_ext
def test_the_fake_kernels_check_the_smallest_size_symbolically(vgg_deployed):
    # exporting with a range that reaches below what the pools allow: torch's guard (from the fake kernels'
    # torch._check) suggests the same smallest size that deploy found by probing
    from torch.fx.experimental import _config as fx_config

    h = torch.export.Dim("h", min=1, max=4096)
    with fx_config.patch(backed_size_oblivious=True), pytest.raises(Exception, match=r"Dim\('h', min=8, max=4096\)"):
        torch.export.export(vgg_deployed["hw"], (torch.randn(2, 3, 17, 15),), dynamic_shapes=({2: h},))
    assert vgg_deployed["hw"].deploy_shapes.min_hw == (8, 8)


@needs_ext
def test_compile_with_a_dynamic_height_and_width(vgg_model, vgg_deployed):
    compiled = torch.compile(vgg_deployed["batch+hw"], fullgraph=True, dynamic=True, backend="aot_eager")
    for n, h, w in [(2, 17, 15), (1, 21, 9), (3, 33, 40)]:
        x = torch.randn(n, 3, h, w)
        assert rel_error(compiled(x), vgg_model(x)) <= 1e-4


def test_a_model_that_runs_at_one_size_only_is_refused_a_dynamic_height_and_width():
    # a 5x5 conv covering its whole 5x5 input, then a Linear: any other size breaks the Linear
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 5), nn.Flatten(), nn.Linear(4, 2)).eval()
    x = torch.randn(1, 3, 7, 7)
    assert "linear" in deploy(model, x, **FAST).deploy_report.routes.values()
    with pytest.raises(ValueError, match=r"dynamic='hw' needs a model that runs at every H x W from 7x7 up, but it "
                                         r"fails at 11x11 .*dynamic='batch'"):
        deploy(model, x, dynamic="hw", **FAST)


def test_export_deployed_checks_its_arguments(vgg_deployed, vgg_model):
    with pytest.raises(ValueError, match="has no deploy_shapes"):
        export_deployed(vgg_model)
    with pytest.raises(ValueError, match=r"example_input is 5x15, outside .* 8x8 to 4096x4096"):
        export_deployed(vgg_deployed["hw"], torch.randn(2, 3, 5, 15))
    with pytest.raises(ValueError, match="example_input has 1 channels, the deployed model takes 3"):
        export_deployed(vgg_deployed["batch"], torch.randn(2, 1, 17, 15))


# --------------------------------------------------------------------------------------------------------- save
def test_save_writes_the_metadata_and_no_temporary_file(vgg_deployed, tmp_path):
    path = save_deployed(vgg_deployed["hw"], tmp_path / "sub" / "m.pt2")
    assert path == tmp_path / "sub" / "m.pt2" and os.listdir(path.parent) == ["m.pt2"]
    with zipfile.ZipFile(path) as z:
        meta = json.loads(z.read(next(n for n in z.namelist() if n.endswith("extra/winoprune.json"))))
    assert meta["format_version"] == ARTIFACT_FORMAT and meta["dynamic"] == "hw"
    assert meta["input_shape"] == [2, 3, 17, 15] and meta["tuned_shape"] == [2, 3, 17, 15]
    assert meta["input_ranges"] == [[2, 2], [3, 3], [8, 4096], [8, 4096]] and meta["dtype"] == "float32"
    loaded = load_deployed(path)
    assert loaded.deploy_shapes == vgg_deployed["hw"].deploy_shapes
    with pytest.raises(AssertionError, match=r"^Guard failed: \w+\.size\(\)\[0\] == 2$"):
        loaded(torch.randn(3, 3, 17, 15))  # a static batch: torch's one-line guard error names the exported size


def test_save_takes_your_own_program(vgg_deployed, tmp_path):
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(vgg_deployed["batch"], (torch.randn(2, 3, 17, 15),), dynamic_shapes=({0: batch},))
    loaded = load_deployed(save_deployed(program, tmp_path / "own.pt2"))
    assert loaded.deploy_shapes == DeployShapes("batch", (2, 3, 17, 15), (17, 15), (17, 15), 64)
    with pytest.raises(ValueError, match="example_input is for a module"):
        save_deployed(program, tmp_path / "x.pt2", torch.randn(2, 3, 17, 15))


@pytest.mark.parametrize("existing", [False, True])
def test_save_is_atomic(vgg_deployed, tmp_path, monkeypatch, existing):
    path = tmp_path / "model.pt2"
    if existing:
        path.write_bytes(b"the previous model")

    def failing_save(program, f, **kwargs):
        f.write(b"PK\x03\x04 half an archive")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch.export, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        save_deployed(vgg_deployed["batch"], path)
    assert sorted(os.listdir(tmp_path)) == (["model.pt2"] if existing else [])  # no temporary file is left
    if existing:
        assert path.read_bytes() == b"the previous model"


@needs_ext
def test_load_round_trip_in_a_fresh_process(saved, tmp_path):
    xs = [torch.randn(1, 3, 8, 8), torch.randn(5, 3, 19, 27)]
    model = load_deployed(saved)
    torch.save({"xs": xs, "ys": [model(x) for x in xs]}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch
        import lightning_winoprune
        from lightning_winoprune.deploy import load_deployed
        model = load_deployed({str(saved)!r})
        io = torch.load({str(tmp_path / 'io.pt')!r})
        for x, y in zip(io["xs"], io["ys"]):
            assert torch.equal(model(x), y), "outputs differ"
        print(model.deploy_shapes.dynamic, model.deploy_shapes.min_hw)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("batch+hw (8, 8)")


# ------------------------------------------------------------------------------------------------ bad files
def _rewrite(src: Path, dst: Path, edit) -> None:
    """Copy the zip ``src`` to ``dst`` with ``edit(name, data)`` applied to every entry (``None`` drops it)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info, data)


def _meta(version: object):
    def edit(name: str, data: bytes) -> bytes:
        if not name.endswith("extra/winoprune.json"):
            return data
        return json.dumps({**json.loads(data), "format_version": version}).encode()
    return edit


def _entry(suffix: str, old: bytes, new: bytes):
    return lambda name, data: data.replace(old, new) if name.endswith(suffix) else data


def _flip_a_weight_byte(src: Path, dst: Path) -> None:
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as z:
        info = next(i for i in z.infolist() if "/data/weights/weight_" in i.filename)
    at = info.header_offset  # the local header: its name and extra field lengths are at bytes 26 and 28
    start = at + 30 + int.from_bytes(data[at + 26:at + 28], "little") + int.from_bytes(data[at + 28:at + 30], "little")
    data[start + 5] ^= 0xFF
    dst.write_bytes(bytes(data))


def _make(case: str, saved: Path, program, path: Path) -> None:
    data = saved.read_bytes()
    if case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif case == "cut_at_the_end":
        path.write_bytes(data[:-40])
    elif case == "garbage":
        path.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist()))
    elif case == "another_zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("notes/readme.txt", "hello")
    elif case == "a_torch_save_file":
        torch.save({"weight": torch.ones(3)}, path)
    elif case == "no_metadata":
        torch.export.save(program, path)
    elif case == "damaged":
        _flip_a_weight_byte(saved, path)
    elif case != "missing":
        edits = {"older_format": _meta(0), "newer_format": _meta(99), "format_not_an_int": _meta("1"),
                 "metadata_not_json": lambda n, d: b"{oops" if n.endswith("winoprune.json") else d,
                 "archive_version": _entry("/archive_version", b"0", b"-1"),
                 "unknown_op": _entry("models/model.json", b"winoprune.max_pool2d", b"winoprune.max_pool9d"),
                 "foreign_op": _entry("models/model.json", b"torch.ops.winoprune.max_pool2d",
                                      b"torch.ops.nosuchlib.max_pool2d"),
                 "schema_version": _entry("models/model.json", b'"schema_version": {"major": ',
                                          b'"schema_version": {"major": 1'),
                 }
        _rewrite(saved, path, edits[case])


BAD = {
    "missing": "no such file",
    "empty": "the file is empty",
    "truncated": r"not a \.pt2 archive: truncated, damaged or not a zip file",
    "cut_at_the_end": r"not a \.pt2 archive: truncated",
    "garbage": r"not a \.pt2 archive",
    "another_zip": "a zip archive but not a torch.export program",
    "a_torch_save_file": "a zip archive but not a torch.export program",
    "no_metadata": r"without lightning_winoprune metadata .*save_deployed",
    "older_format": r"written in an older artifact format \(0, .* deploy and save the model again",
    "newer_format": r"written in a newer artifact format \(99, .* upgrade lightning_winoprune",
    "format_not_an_int": "has no format version",
    "metadata_not_json": "metadata is not valid JSON",
    "archive_version": r"its \.pt2 archive version is '-1', torch .* reads version '0'",
    "damaged": r"the archive is damaged: entry '.*weight_.*' fails its CRC check",
    "unknown_op": r"uses the operator winoprune::max_pool9d, but this lightning_winoprune .* does not define it",
    "foreign_op": r"uses the operator nosuchlib::max_pool2d, but it is not registered in this process",
    "schema_version": r"torch\.export\.load refused it: SerializeError: Serialized schema version",
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_file_is_one_line_naming_it(case, saved, vgg_deployed, tmp_path, capfd):
    program = export_deployed(vgg_deployed["batch"]) if case == "no_metadata" else None
    path = tmp_path / f"{case}.pt2"
    _make(case, saved, program, path)
    capfd.readouterr()
    with pytest.raises(DeployArtifactError, match=BAD[case]) as info:
        load_deployed(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"cannot load deployed model {str(path)!r}: ")
    assert len(message) < 400
    assert "Traceback" not in capfd.readouterr().err  # torch's logged traceback is kept out of the way
    assert isinstance(info.value, ValueError)
