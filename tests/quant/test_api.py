"""Codec API shared by all codecs: sizes, layout, out=, packed byte-range views, grad, errors."""

import pytest
import torch

from streamtune.quant import (
    CODECS,
    PART_ALIGN_BYTES,
    bits_per_element,
    encoded_nbytes,
    get_codec,
    pack_parts,
    part_views,
    place_parts,
)

SHAPES = [(), (1,), (130,), (3, 7, 65), (8, 64), (0, 4), (2, 3, 4, 5)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _tensor(shape, dtype, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", list(CODECS))
def test_layout_matches_encode_and_nbytes(name, shape, dtype):
    codec = get_codec(name)
    parts = codec.encode(_tensor(shape, dtype))
    layout = codec.layout(shape, dtype)
    assert [spec.name for spec in layout] == list(parts)
    for spec in layout:
        part = parts[spec.name]
        assert (part.dtype, tuple(part.shape)) == (spec.dtype, spec.shape)
        assert part.is_contiguous() and part.device.type == "cpu"
    total = sum(p.numel() * p.element_size() for p in parts.values())
    assert encoded_nbytes(name, shape, dtype) == total


def test_bf16_keeps_dtype_and_sizes_are_as_documented():
    for dtype in DTYPES:
        assert get_codec("bf16").encode(torch.ones(3, dtype=dtype))["data"].dtype == dtype
    shape = (128, 1408, 2816)
    assert encoded_nbytes("bf16", shape, torch.bfloat16) == 2 * 128 * 1408 * 2816
    assert bits_per_element("int8", shape, torch.bfloat16) == pytest.approx(8 + 32 / 2816)
    assert bits_per_element("nf4-fp32absmax", shape, torch.bfloat16) == pytest.approx(4.5)
    assert bits_per_element("nf4", shape, torch.bfloat16) == pytest.approx(4 + 8 / 64 + 64 / (64 * 256), rel=1e-4)


@pytest.mark.parametrize("shape", [(3, 7, 65), (130,), (40, 300)])
@pytest.mark.parametrize("name", list(CODECS))
def test_encode_into_out_writes_every_byte_the_same_as_a_fresh_encode(name, shape):
    codec = get_codec(name)
    x = _tensor(shape, torch.bfloat16, seed=3)
    expected = codec.encode(x)
    # out= starts from garbage: the encoder must write every element (no reliance on zeroed memory)
    out = {spec.name: torch.full(spec.shape, 77, dtype=torch.uint8).view(spec.dtype)
           if spec.dtype.itemsize == 1 else torch.full(spec.shape, 7.5, dtype=spec.dtype)
           for spec in codec.layout(shape, torch.bfloat16)}
    result = codec.encode(x, out=out)
    assert result is out
    for key, part in expected.items():
        assert torch.equal(out[key], part), key


def test_encode_into_out_of_the_wrong_layout_is_rejected():
    codec = get_codec("int8")
    x = _tensor((4, 8), torch.bfloat16)
    with pytest.raises(ValueError, match="scale"):
        codec.encode(x, out={"q": torch.empty(4, 8, dtype=torch.int8), "scale": torch.empty(5)})


@pytest.mark.parametrize("name", list(CODECS))
def test_decode_into_out(name):
    codec = get_codec(name)
    x = _tensor((5, 96), torch.bfloat16)
    parts = codec.encode(x)
    expected = codec.decode(parts, x.shape, torch.bfloat16).clone()
    out = torch.full((5, 96), float("nan"), dtype=torch.bfloat16)
    result = codec.decode(parts, x.shape, torch.bfloat16, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert torch.equal(out, expected)


def test_bf16_decode_is_a_zero_copy_view():
    codec = get_codec("bf16")
    x = _tensor((4, 8), torch.bfloat16)
    parts = codec.encode(x)
    decoded = codec.decode(parts, (4, 8), torch.bfloat16)
    assert decoded.data_ptr() == parts["data"].data_ptr()
    assert codec.is_identity and not get_codec("int8").is_identity


def test_decode_from_packed_byte_range_views():
    tensors = {
        "experts": _tensor((4, 24, 64), torch.bfloat16, 1),
        "proj": _tensor((33, 70), torch.bfloat16, 2),
        "norm": _tensor((70,), torch.float32, 3),
    }
    for name in CODECS:
        codec = get_codec(name)
        offset, placed = 3, {}
        for key, tensor in tensors.items():
            placed[key], offset = place_parts(codec.layout(tensor.shape, tensor.dtype), offset)
        buf = torch.zeros(offset + 17, dtype=torch.uint8)
        encoded = {key: codec.encode(tensor) for key, tensor in tensors.items()}
        for key in tensors:
            pack_parts(encoded[key], placed[key], buf)
            assert all(off % PART_ALIGN_BYTES == 0 for _, off in placed[key])
        for key, tensor in tensors.items():
            views = part_views(buf, placed[key])
            for spec, off in placed[key]:
                assert views[spec.name].data_ptr() == buf.data_ptr() + off
            direct = codec.decode(encoded[key], tensor.shape, tensor.dtype)
            assert torch.equal(codec.decode(views, tensor.shape, tensor.dtype), direct)
            out = torch.empty_like(tensor)
            codec.decode(views, tensor.shape, tensor.dtype, out=out)
            assert torch.equal(out, direct)


@pytest.mark.parametrize("name", list(CODECS))
def test_decoded_weights_never_require_grad(name):
    codec = get_codec(name)
    weight = torch.nn.Parameter(_tensor((6, 64), torch.float32))
    parts = codec.encode(weight)
    assert not any(p.requires_grad for p in parts.values())
    with torch.enable_grad():
        assert not codec.decode(parts, (6, 64), torch.float32).requires_grad
        assert not codec.decode(parts, (6, 64), torch.bfloat16).requires_grad
        out = torch.empty(6, 64, requires_grad=True)
        with pytest.raises(ValueError, match="out requires grad"):
            codec.decode(parts, (6, 64), torch.float32, out=out)


def test_unknown_codec_names_the_allowed_ones():
    with pytest.raises(ValueError, match="codec 'fp8' is unknown; allowed: bf16, int8, nf4"):
        get_codec("fp8")
    with pytest.raises(ValueError, match="allowed: bf16, int8"):
        encoded_nbytes("q4", (4, 4), torch.bfloat16)


@pytest.mark.parametrize("name", list(CODECS))
def test_bad_inputs_are_rejected_with_clear_messages(name):
    codec = get_codec(name)
    with pytest.raises(ValueError, match="torch.int64 cannot be encoded; allowed: bfloat16"):
        codec.encode(torch.arange(8))
    with pytest.raises(ValueError, match="not a valid tensor shape"):
        codec.layout((4, -1), torch.float32)
    parts = codec.encode(_tensor((4, 64), torch.float32))
    first = next(iter(parts))
    broken = dict(parts, **{first: parts[first].reshape(-1)[:-1].clone()})
    with pytest.raises(ValueError, match=f"part '{first}'"):
        codec.decode(broken, (4, 64), torch.float32)
    with pytest.raises(ValueError, match="missing"):
        codec.decode({}, (4, 64), torch.float32)
    with pytest.raises(ValueError, match="out is"):
        codec.decode(parts, (4, 64), torch.float32, out=torch.empty(4, 65))


def test_pack_rejects_a_short_buffer():
    codec = get_codec("int8")
    placed, end = place_parts(codec.layout((4, 64), torch.float32))
    with pytest.raises(ValueError, match=f"the parts need {end}"):
        part_views(torch.empty(end - 1, dtype=torch.uint8), placed)
    with pytest.raises(ValueError, match="1-D uint8"):
        part_views(torch.empty(end, dtype=torch.int8), placed)


@pytest.mark.parametrize("shape", [(3, 7, 65), (40000,), (2, 300, 128), (5,)])
@pytest.mark.parametrize("name", list(CODECS))
def test_encoding_by_segments_writes_the_bytes_of_a_whole_encode(name, shape):
    codec = get_codec(name)
    x = _tensor(shape, torch.bfloat16, seed=5)
    expected = codec.encode(x)
    parts = {spec.name: torch.full(spec.shape, 3, dtype=torch.uint8).view(spec.dtype) if spec.dtype.itemsize == 1
             else torch.full(spec.shape, 9.0, dtype=spec.dtype) for spec in codec.layout(shape, torch.bfloat16)}
    flat, numel = x.reshape(-1), x.numel()
    step = codec.segment_numel(shape)
    segment = step * max(1, 3000 // step)  # several segments, the last one short
    for start in range(0, numel, segment):
        codec.encode_segment(flat, start, min(start + segment, numel), shape, parts)
    for key, part in expected.items():
        assert torch.equal(parts[key], part), key


@pytest.mark.parametrize("name", ["int8", "nf4"])
def test_unaligned_segment_is_rejected(name):
    codec = get_codec(name)
    shape = (4, 40000)
    parts = codec.encode(torch.zeros(shape))
    with pytest.raises(ValueError, match="not aligned"):
        codec.encode_segment(torch.zeros(160000), 1, 50000, shape, parts)
