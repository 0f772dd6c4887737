"""Kernel selection by device capability, with fake capabilities (no GPU needed)."""

from __future__ import annotations

import pytest

from streamtune.kernels import select_kernels


def test_eager_selects_nothing_anywhere():
    for device, cap in (("cpu", None), ("cuda", (9, 0)), ("cuda", (8, 9))):
        choice = select_kernels("eager", device, "bfloat16", cap)
        assert not (choice.lora_compute_dtype or choice.fused_linear_ce or choice.flex_attention or choice.grouped_mm)


def test_cpu_fp32_keeps_stock_lora_and_attention_but_fuses_the_loss():
    choice = select_kernels("auto", "cpu", "float32")
    assert choice.fused_linear_ce and not choice.compile_loss
    assert not choice.lora_compute_dtype and not choice.flex_attention and not choice.grouped_mm
    assert select_kernels("auto", "cpu", "bfloat16").lora_compute_dtype


def test_h200_gets_everything_and_the_measured_head_dim_512_options():
    choice = select_kernels("auto", "cuda", "bfloat16", (9, 0))
    assert choice.lora_compute_dtype and choice.fused_linear_ce and choice.compile_loss
    assert choice.flex_attention and choice.grouped_mm
    assert choice.kernel_options(128) is None  # Triton's defaults at head_dim 128
    assert choice.kernel_options(256) == {"BLOCK_M": 128, "BLOCK_N": 64, "num_stages": 2, "num_warps": 8}
    opts = choice.kernel_options(512)
    assert opts["BLOCK_M"] == 64 and opts["BLOCK_N"] == 32 and opts["num_stages"] == 2 and opts["num_warps"] == 8
    assert select_kernels("auto", "cuda", "bfloat16", (10, 0)).grouped_mm


@pytest.mark.parametrize("cap", [(8, 9), (8, 6)])
def test_consumer_cards_get_small_tiles_and_no_grouped_mm(cap):
    choice = select_kernels("auto", "cuda", "bfloat16", cap)
    assert choice.flex_attention and not choice.grouped_mm
    assert choice.kernel_options(128) is None
    small = choice.kernel_options(256)
    assert small["BLOCK_M"] <= 32 and small["BLOCK_N"] <= 32 and small["num_stages"] == 1
    assert choice.kernel_options(512) == small


def test_pre_ampere_keeps_stock_attention():
    choice = select_kernels("auto", "cuda", "float16", (7, 5))
    assert not choice.flex_attention and not choice.grouped_mm and choice.fused_linear_ce


def test_bad_mode_and_missing_capability_are_refused():
    with pytest.raises(ValueError, match="train.kernels"):
        select_kernels("fast", "cpu")
    with pytest.raises(ValueError, match="capability"):
        select_kernels("auto", "cuda", "bfloat16", None)


def test_config_rejects_unknown_kernels_mode():
    from streamtune.config import RunConfig, validate

    cfg = RunConfig()
    cfg.train.kernels = "fast"
    assert any("train.kernels" in p for p in validate(cfg))


def test_fused_norms_on_cuda_only_and_layer_compile_on_cuda_sm80_unless_turned_off():
    assert select_kernels("auto", "cuda", "bfloat16", (9, 0)).fused_norm_act
    assert select_kernels("auto", "cuda", "bfloat16", (8, 9)).fused_norm_act
    assert not select_kernels("auto", "cpu", "bfloat16").fused_norm_act
    assert not select_kernels("eager", "cuda", "bfloat16", (9, 0)).fused_norm_act
    # train.compile_layers empty (None): on for CUDA sm80+, off below and on the CPU
    assert select_kernels("auto", "cuda", "bfloat16", (9, 0)).compile_layers
    assert select_kernels("auto", "cuda", "bfloat16", (8, 9)).compile_layers
    assert not select_kernels("auto", "cuda", "float16", (7, 5)).compile_layers
    assert not select_kernels("auto", "cpu", "float32").compile_layers
    assert not select_kernels("auto", "cuda", "bfloat16", (9, 0), compile_layers=False).compile_layers
    assert select_kernels("auto", "cuda", "float16", (7, 5), compile_layers=True).compile_layers
    assert select_kernels("auto", "cpu", "float32", compile_layers=True).compile_layers
    assert not select_kernels("eager", "cpu", "float32", compile_layers=True).compile_layers
    assert not select_kernels("eager", "cuda", "bfloat16", (9, 0)).compile_layers
    assert select_kernels("auto", "cuda", "bfloat16", (9, 0), True).describe()["compile_layers"] is True
