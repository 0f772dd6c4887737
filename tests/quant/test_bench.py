"""The decode/encode benchmark helpers run on the CPU and report positive throughput."""

import pytest

from streamtune.quant import CODECS
from streamtune.quant.bench import benchmark_decode, benchmark_encode


def test_benchmark_decode_on_cpu_reports_every_codec():
    results = benchmark_decode("cpu", numel=1 << 15, repeats=1)
    assert set(results) == set(CODECS)
    assert all(gbps > 0 for gbps in results.values())


def test_benchmark_encode_reports_throughput():
    assert benchmark_encode("nf4", numel=1 << 15) > 0
    with pytest.raises(ValueError, match="numel and repeats must be > 0"):
        benchmark_decode("cpu", numel=0)
