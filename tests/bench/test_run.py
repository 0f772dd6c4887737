"""The bench summary holds whatever variants are missing, skipped, failed or streamed nothing."""

from __future__ import annotations

import pytest

from streamtune.bench.run import format_report


def _row(variant, tokens, step_s=None, h2d_bytes=None, error=None):
    return {"variant": variant, "tokens": tokens, "step_s": step_s, "tok_s": tokens / step_s if step_s else None,
            "gpu_peak_bytes": 1 << 30 if step_s else None, "h2d_bytes": h2d_bytes, "h2d_gbps": None,
            "copy_wait_s": None, "error": error, "extra": {}}


def test_nothing_streamed_and_resident_skipped_is_no_crash():
    report = {"link": {"h2d_gbps": 54.0}, "results": [_row("streamtune", 2048, 0.5, h2d_bytes=0.0)]}
    text = format_report(report)
    assert "no bound: nothing streamed, resident not timed" in text


def test_ratios_against_resident_and_baselines():
    report = {"link": {"h2d_gbps": 50.0}, "results": [
        _row("streamtune", 2048, 0.8, h2d_bytes=20e9), _row("resident", 2048, 0.5),
        _row("stock", 2048, 1.6), _row("accelerate", 2048, 8.0), _row("fsdp2", 2048, error="OOM: out of memory"),
        _row("streamtune", 8192, error="child exited 1"),
    ]}
    text = format_report(report)
    # bound = max(0.5 s resident, 20 GB / 50 GB/s = 0.4 s)
    assert "2048 tokens: streamtune/bound = 1.60" in text
    assert "x0.62 resident" in text and "x2.00 stock" in text and "x10.00 accelerate" in text
    assert "fsdp2" not in text.split("\n")[-1]  # a failed baseline gives no ratio
    assert "8192 tokens" not in text  # a failed streamtune row gives no summary line
    assert "OOM: out of memory" in text and "child exited 1" in text


def test_without_a_resident_step_the_copy_floor_is_no_bound_and_holds_no_target():
    report = {"link": {"h2d_gbps": 50.0}, "results": [_row("streamtune", 2048, 0.6, h2d_bytes=20e9),
                                                      _row("stock", 2048, 1.2)]}
    text = format_report(report)
    assert "2048 tokens: streamtune/copy floor = 1.50 (streamed bytes / pinned H2D 0.400 s; resident not timed" in text
    assert "target" not in text and "x2.00 stock" in text


def test_missing_link_and_missing_fields():
    report = {"link": {}, "results": [_row("streamtune", 512, 0.2), {"variant": "accelerate", "tokens": None,
                                                                   "error": "child exited 9"}]}
    text = format_report(report)
    assert "no bound" in text and "child exited 9" in text


def test_mfu_from_active_params_and_the_measured_peak():
    row = _row("streamtune", 2048, 0.5, h2d_bytes=0.0)
    row["extra"]["active_params"] = 4e9
    report = {"link": {"h2d_gbps": 50.0, "matmul_tflops": 800.0}, "results": [row, _row("resident", 2048, 0.4)]}
    # 6 * 4e9 * 2048 / 0.5 s / 800e12 = 12.3 %; resident at 0.4 s: 15.4 %
    assert "MFU 12.3% (resident 15.4%)" in format_report(report)


def test_planner_errors_against_the_measured_step_and_tensor_peak():
    row = _row("streamtune", 2048, 0.5, h2d_bytes=0.0)  # 1 GiB measured peak
    row["extra"].update(predicted_step_s=0.55, predicted_tensor_peak_bytes=0.95 * (1 << 30))
    assert "planner error: step +10%, tensor peak -5%" in format_report({"link": {}, "results": [row]})


def test_note_gives_the_step_spread_and_allocator_retries():
    row = _row("streamtune", 2048, 0.378)
    row["extra"] = {"num_streamed": 9, "step_times_s": [27.7, 0.364, 0.386, 0.412, 0.333, 0.314, 0.378],
                    "alloc_retries": 3}
    line = format_report({"link": {}, "results": [row]}).splitlines()[1]
    assert line.endswith("streamed 9, steps 0.314-0.412 s, 3 allocator retries"), line
    row["extra"] = {"num_streamed": 9, "alloc_retries": 0}
    assert format_report({"link": {}, "results": [row]}).splitlines()[1].endswith("streamed 9")
    row["extra"] = {"num_streamed": 14, "kernel_calls": {"wide_attention": 105, "batched_int8_decode": 420,
                                                         "flex_attention": 630}, "counted_steps": 7}
    line = format_report({"link": {}, "results": [row]}).splitlines()[1]
    assert line.endswith("streamed 14, wide attention 15/step, int8 decode launches 60/step"), line


def test_a_negative_gc_interval_is_refused_before_anything_runs(capsys):
    import pytest

    from streamtune.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["bench", "--gc-every-steps", "-1", "--tokens", "512"])
    assert exc.value.code == 2
    assert "argument --gc-every-steps: '-1' is not an integer >= 0" in capsys.readouterr().err


def _bench_args(*argv):
    import argparse

    from streamtune.bench.run import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_the_stock_variant_is_refused_before_building_when_the_model_cannot_sit_on_the_gpu():
    import pytest

    from streamtune.bench.run import check_variants
    from streamtune.errors import InputError

    with pytest.raises(InputError, match=r"gemma4-26b-a4b in bf16 is 4\d\.\d GiB .* 24\.0 GiB; leave stock out"):
        check_variants(_bench_args("--variants", "streamtune,stock"), 24 << 30)
    check_variants(_bench_args("--variants", "streamtune,stock"), 141 << 30)  # an H200 holds it
    check_variants(_bench_args("--variants", "stock", "--model", "tiny-gemma4"), 1 << 30)
    check_variants(_bench_args(), 24 << 30)  # the default variants have no stock step


def test_an_unknown_variant_is_refused_with_the_allowed_ones():
    import pytest

    from streamtune.bench.run import check_variants
    from streamtune.errors import InputError

    with pytest.raises(InputError, match="unknown stok; allowed: streamtune, stock, accelerate, fsdp2"):
        check_variants(_bench_args("--variants", "streamtune,stok"), 24 << 30)


@pytest.mark.parametrize("variants, said", [
    ("streamtune,stok", "bench --variants: unknown stok; allowed: streamtune, stock, accelerate, fsdp2"),
    ("streamtune,stock", "leave stock out of --variants on this card"),
])
def test_bench_refuses_bad_variants_with_exit_code_2_before_measuring(monkeypatch, capsys, variants, said):
    """As a user meets it: `streamtune bench` on a 24 GiB card, before the link is measured or weights built."""
    import torch

    import streamtune.bench.common as common
    from streamtune.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: type("P", (), {"total_memory": 24 << 30}))
    monkeypatch.setattr(common, "measure_link", lambda: pytest.fail("measured the link before checking --variants"))
    assert main(["bench", "--variants", variants]) == 2
    assert said in capsys.readouterr().err
