"""The decode/encode benchmark helpers run on the CPU and report positive throughput."""

import pytest
import torch

from streamtune.quant import CODECS
from streamtune.quant.bench import benchmark_decode, benchmark_encode, stacked_parts


def test_benchmark_decode_on_cpu_reports_every_codec():
    results = benchmark_decode("cpu", numel=1 << 15, repeats=1)
    assert set(results) == set(CODECS)
    assert all(gbps > 0 for gbps in results.values())


def test_benchmark_encode_reports_throughput():
    assert benchmark_encode("nf4", numel=1 << 15) > 0
    with pytest.raises(ValueError, match="numel and repeats must be > 0"):
        benchmark_decode("cpu", numel=0)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_stacked_parts_are_the_encoding_of_the_stacked_tensor(name):
    """The decode benchmark encodes one block on the CPU and stacks its parts to a layer's size on the device."""
    codec = CODECS[name]
    block = torch.randn(4, 4096, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)  # 16384 elements
    stacked = stacked_parts(codec.encode(block), 3)
    whole = codec.encode(torch.cat([block] * 3))
    assert stacked.keys() == whole.keys()
    for key in whole:
        assert torch.equal(stacked[key], whole[key]), key
    assert torch.equal(codec.decode(stacked, (12, 4096), torch.bfloat16), codec.decode(whole, (12, 4096), torch.bfloat16))


def test_benchmark_decode_stacks_an_encoded_block_to_the_requested_size():
    results = benchmark_decode("cpu", numel=1 << 16, repeats=1, max_encoded_numel=1 << 14)
    assert set(results) == set(CODECS) and all(gbps > 0 for gbps in results.values())
