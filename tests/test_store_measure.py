"""``dfmsd bench store``'s encoding report (``store.measure.quantization_report``) on tiny
random-init models and generated images: the lossless encoding has no error and no loss change,
the lossy ones a small, ordered one."""

from __future__ import annotations

import math

import pytest
from conftest import small_synthetic, train_files

from dfmsd_cli.data.coco import CocoDetection
from dfmsd_cli.data.geometry import Geometry
from dfmsd_cli.models.checkpoint import load_teacher
from dfmsd_cli.store.measure import quantization_report


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = small_synthetic(tmp_path_factory, 3)
    ds = CocoDetection(*train_files(root), geometry=Geometry(img_scale=(128, 96)), train=False)
    teacher = load_teacher("retina_tiny", ds.num_classes, None, 0)
    student = load_teacher("retina_tiny", ds.num_classes, None, 1)
    return quantization_report(teacher, ds, [0, 1, 2], student)["encodings"]


def test_float32_is_exact_and_the_reference_is_counted_once(report):
    e = report["float32"]
    assert e["relative_rmse_max"] == 0.0
    # was 0.5 for every other encoding when the float32 reference was summed twice
    assert e["loss_relative_change_mean"] == 0.0
    assert 0 < report["float16"]["loss_relative_change_mean"] < 1e-3


def test_error_grows_as_bits_are_dropped(report):
    rmse = [report[k]["relative_rmse_mean"] for k in ("float16", "float16+keep7", "float16+keep3")]
    assert 0 < rmse[0] < rmse[1] < rmse[2] < 0.1
    # bytes fall as bits are dropped (the zeroed mantissa bits compress away)
    assert report["float16+keep3"]["bytes_per_image"] < report["float16"]["bytes_per_image"]
    # float16's rounding is 2^-11 relative: half an ulp on average is well below 1e-3
    assert report["float16"]["relative_rmse_mean"] < 1e-3
    assert report["float16+quantize1"]["relative_rmse_mean"] > 0


def test_every_codec_row_is_measured_or_marked_refused(report):
    for name, e in report.items():
        for codec, nbytes in e["codecs"].items():
            if math.isnan(nbytes):  # PCodec refuses 8-bit types
                assert name == "uint8" and codec.startswith("pcodec")
            else:
                assert nbytes > 0 and codec in e["codec_MBps"]


def test_direct_decode_reads_the_chunks_get_reads(tiny_cache):
    """``read_overhead``'s floor decodes the same chunks ``TeacherStore.get`` does (flat chunk
    keys included), and both are timed."""
    from dfmsd_cli.store.measure import _decode_direct, read_overhead
    from dfmsd_cli.store.reader import TeacherStore

    path = tiny_cache / "retina_tiny" / "train2017.zarr"
    store = TeacherStore.open(path)
    for i in (0, 1):
        direct, got = _decode_direct(store, i, "orig"), store.get(i, "orig")
        for s, f in got["features"].items():
            assert float(abs(direct[f"feat/orig/{s}"]).sum()) == pytest.approx(
                float(f.abs().sum()), rel=1e-6
            )
    r = read_overhead(str(path), repeats=1)
    assert r["images"] == 12 and r["get_ms"] > 0 and r["direct_decode_ms"] > 0
