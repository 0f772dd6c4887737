"""The ``bf16`` (identity) and ``int8`` (symmetric, per output row) codecs."""

from __future__ import annotations

import torch

from streamtune.quant.base import (
    Codec,
    PartSpec,
    TritonDecode,
    check_decode_backend,
    check_float_dtype,
    check_out,
    check_parts,
    check_segment,
    decode_target,
    encode_target,
    normalize_shape,
    rows_per_chunk,
)
from streamtune.quant.cpu_encode import encode_int8_rows, run_chunks

ENCODE_CHUNK_NUMEL = 1 << 18
CPU_DECODE_CHUNK_NUMEL = 1 << 20
_INT8_TRITON = TritonDecode("streamtune.quant.int8_triton", "int8_decode_triton", "int8")


class Bf16Codec(Codec):
    """Identity codec: the tensor is stored as is, in its own dtype, as part ``"data"``.

    The name is historical: bf16, fp16 and fp32 tensors all keep their dtype.
    """

    name = "bf16"
    is_identity = True

    def layout(self, shape, dtype) -> list[PartSpec]:
        """One part ``"data"`` of the tensor's own dtype and shape.

        Raises:
            ValueError: ``dtype`` is not floating or ``shape`` is invalid.
        """
        check_float_dtype(dtype)
        return [PartSpec("data", dtype, normalize_shape(shape))]

    def encode(self, tensor: torch.Tensor, out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The tensor itself, made contiguous (a copy only when it was not, or into ``out``).

        Raises:
            ValueError: the tensor's dtype is not floating, or ``out`` does not match.
        """
        check_float_dtype(tensor.dtype, "tensor dtype")
        if out is None:
            return {"data": tensor.detach().contiguous()}
        encode_target(self, tensor, out)["data"].copy_(tensor.detach())
        return out

    def decode(self, parts, shape, dtype, out=None) -> torch.Tensor:
        """A view of the stored part when ``out`` is None and the dtype matches, else a copy.

        Raises:
            ValueError: the part does not match the layout, or ``out`` does not match.
        """
        shape = normalize_shape(shape)
        data = parts.get("data")
        if data is None:
            raise ValueError(f"codec 'bf16': part 'data' is missing (got {sorted(parts)})")
        check_parts(self, parts, shape, data.dtype)
        check_out(out, shape, dtype, data.device)
        with torch.no_grad():
            if out is not None:
                out.copy_(data)
                return out
            if data.dtype == dtype:
                return data.detach()
            return data.to(dtype)


    def segment_numel(self, shape) -> int:
        """Any element range."""
        return 1

    def encode_segment(self, flat, start, stop, shape, parts) -> None:
        """Copy elements ``start:stop`` into ``parts["data"]``.

        Raises:
            ValueError: the range is out of bounds.
        """
        check_segment(self, normalize_shape(shape), start, stop)
        parts["data"].view(-1)[start:stop].copy_(flat[start:stop])


class Int8Codec(Codec):
    """Symmetric int8 per row of the last dimension (``scale = absmax / 127``, round to nearest).

    Parts: ``"q"`` (int8, the tensor's shape) and ``"scale"`` (float32, ``shape[:-1]``). The last
    dimension is the reduction (input) dimension of ``nn.Linear`` weights ``[out, in]`` and of fused
    expert tensors ``[E, 2F, H]`` / ``[E, H, F]``, so a 3-D tensor gets one scale per expert and row.
    A 0-D tensor is one row of one element (``scale`` shape ``()``). All-zero rows get scale 0 and
    decode to exact zeros. Error bound per row: ``|x - decode(x)| <= absmax / 254`` plus one rounding
    of the output dtype.
    """

    name = "int8"

    def layout(self, shape, dtype) -> list[PartSpec]:
        """Parts ``"q"`` (int8, ``shape``) and ``"scale"`` (float32, ``shape[:-1]``).

        Raises:
            ValueError: ``dtype`` is not floating or ``shape`` is invalid.
        """
        check_float_dtype(dtype)
        shape = normalize_shape(shape)
        return [PartSpec("q", torch.int8, shape), PartSpec("scale", torch.float32, shape[:-1])]

    def encode(self, tensor: torch.Tensor, out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Quantize row by row on the CPU, in chunks of about ``ENCODE_CHUNK_NUMEL`` elements.

        Chunks run on a pool of ``torch.get_num_threads()`` threads; peak extra memory is one float32
        chunk per thread, whatever the tensor size. The parts are CPU tensors (a tensor on another
        device is copied to the CPU first).

        Raises:
            ValueError: the tensor's dtype is not floating, or ``out`` does not match the layout.
        """
        parts = encode_target(self, tensor, out)
        shape = tuple(tensor.shape)
        row_numel = shape[-1] if shape else 1
        q, scale = parts["q"], parts["scale"]
        if tensor.numel() == 0:
            return parts
        rows = tensor.detach().cpu().contiguous().view(-1, row_numel)
        q_rows, scale_rows = q.view(-1, row_numel), scale.view(-1)
        step = rows_per_chunk(row_numel, ENCODE_CHUNK_NUMEL)
        chunks = [
            (rows[start : start + step], q_rows[start : start + step], scale_rows[start : start + step])
            for start in range(0, rows.shape[0], step)
        ]
        run_chunks(encode_int8_rows, chunks)
        return parts

    def segment_numel(self, shape) -> int:
        """Whole rows of the last dimension."""
        shape = normalize_shape(shape)
        return shape[-1] if shape else 1

    def encode_segment(self, flat, start, stop, shape, parts) -> None:
        """Quantize the rows in elements ``start:stop`` into their rows of ``parts``.

        Raises:
            ValueError: the range is not made of whole rows.
        """
        shape = normalize_shape(shape)
        check_segment(self, shape, start, stop)
        row_numel = self.segment_numel(shape)
        first, last = start // row_numel, stop // row_numel
        rows = flat[start:stop].view(-1, row_numel)
        out = {"q": parts["q"].view(-1, row_numel)[first:last], "scale": parts["scale"].view(-1)[first:last]}
        self.encode(rows, out=out)

    def decode(self, parts, shape, dtype, out=None, *, backend: str = "auto") -> torch.Tensor:
        """``q * scale`` per row (float32 product, one rounding), written into ``out``.

        Args:
            parts: the parts (see the class docstring).
            shape: original shape.
            dtype: output dtype.
            out: output tensor (same shape/dtype, on the parts' device); allocated when None.
            backend: ``"triton"`` (fused kernel), ``"torch"`` (``torch.mul``; chunked on the CPU), or
                ``"auto"``: Triton on CUDA when it imports and works, torch otherwise. Both give the
                same values.

        Raises:
            ValueError: the parts or ``out`` do not match the layout, or ``backend`` is unknown.
        """
        check_decode_backend(backend)
        shape, out = decode_target(self, parts, shape, dtype, out)
        device = out.device
        if out.numel() == 0:
            return out
        row_numel = shape[-1] if shape else 1
        q_rows = parts["q"].view(-1, row_numel)
        scale_col = parts["scale"].view(-1, 1)
        out_rows = out.view(-1, row_numel)
        with torch.no_grad():
            if _INT8_TRITON.wanted(backend, device) and _INT8_TRITON.run(backend, q_rows, scale_col.view(-1), out_rows):
                return out
            max_numel = out.numel() if device.type == "cuda" else CPU_DECODE_CHUNK_NUMEL
            step = rows_per_chunk(row_numel, max_numel)
            for start in range(0, q_rows.shape[0], step):
                stop = start + step
                torch.mul(q_rows[start:stop], scale_col[start:stop], out=out_rows[start:stop])
        return out
