"""The codec interface, part specs, and helpers shared by the codecs.

A codec turns one frozen tensor into named *parts* (plain contiguous tensors) and back. Parts are what
the engine packs, byte range by byte range, into one flat ``uint8`` buffer per decoder layer; a
decoder reads them back from views of that buffer (``buf[off:off + n].view(dtype).view(shape)``).
"""

from __future__ import annotations

import importlib
import math
import warnings
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


@dataclass(frozen=True)
class PartSpec:
    """One encoded part of a tensor: a name, a dtype and a shape.

    Attributes:
        name: key of the part in the dict ``Codec.encode`` returns.
        dtype: element type of the part.
        shape: shape of the part.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        """Number of elements of the part."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Size of the part in bytes."""
        return self.numel * self.dtype.itemsize


class Codec:
    """Base class of the transfer codecs.

    Attributes:
        name: registry name (``"bf16"``, ``"int8"``, ``"nf4"``, ...).
        is_identity: True when the stored part is the tensor itself (no decode work; the engine binds
            parameters straight to the slot bytes).
    """

    name: str = ""
    is_identity: bool = False

    def layout(self, shape: tuple[int, ...], dtype: torch.dtype) -> list[PartSpec]:
        """The parts ``encode`` produces for a tensor of ``shape`` and ``dtype``; pure arithmetic.

        Raises:
            ValueError: ``dtype`` is not a floating dtype or ``shape`` has a negative dimension.
        """
        raise NotImplementedError

    def encode(self, tensor: torch.Tensor, out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Encode ``tensor`` (on the CPU) into contiguous parts matching ``layout``.

        Args:
            tensor: the tensor to encode.
            out: CPU tensors to write the parts into (e.g. views of a packed host buffer), one per
                part of ``layout`` with its dtype and shape; every element is written. Allocated
                when None.

        Raises:
            ValueError: the tensor's dtype is not floating, or ``out`` does not match the layout.
        """
        raise NotImplementedError

    def segment_numel(self, shape: tuple[int, ...]) -> int | None:
        """Granularity of :meth:`encode_segment` in elements of the flattened tensor (None: whole tensors only)."""
        return None

    def encode_segment(self, flat: torch.Tensor, start: int, stop: int, shape: tuple[int, ...],
                       parts: dict[str, torch.Tensor]) -> None:
        """Encode elements ``start:stop`` of the flattened tensor ``flat`` (of ``shape``) into their
        slices of ``parts`` (the whole tensor's parts), the same bytes a whole ``encode`` writes there.

        ``start`` must be a multiple of :meth:`segment_numel`, and ``stop`` one too or the end.
        Lets a loader encode the first segments of a tensor while the rest is still being read.

        Raises:
            ValueError: the codec has no segments, or the range is not aligned.
        """
        raise ValueError(f"codec {self.name!r} encodes whole tensors only")

    def decode(
        self,
        parts: dict[str, torch.Tensor],
        shape: tuple[int, ...],
        dtype: torch.dtype,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decode ``parts`` into a tensor of ``shape`` and ``dtype`` on the parts' device.

        Args:
            parts: the parts, as ``encode`` returned them or as views of a packed buffer.
            shape: shape of the decoded tensor (the original shape).
            dtype: dtype of the decoded tensor (normally the original dtype).
            out: tensor to write into (same shape and dtype, same device as the parts); allocated
                when None.

        Raises:
            ValueError: a part is missing or has the wrong dtype/shape, or ``out`` does not match.
        """
        raise NotImplementedError

    def nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """Total bytes of the encoded parts (no alignment padding)."""
        return sum(spec.nbytes for spec in self.layout(shape, dtype))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def encode_target(codec: Codec, tensor: torch.Tensor, out: dict[str, torch.Tensor] | None,
                  fill_zero: bool = False) -> dict[str, torch.Tensor]:
    """The part tensors an ``encode`` call writes: ``out`` checked against the layout, or new ones.

    Raises:
        ValueError: the tensor's dtype is not floating, or ``out`` does not match the layout.
    """
    check_float_dtype(tensor.dtype, "tensor dtype")
    if out is None:
        make = torch.zeros if fill_zero else torch.empty
        return {spec.name: make(spec.shape, dtype=spec.dtype) for spec in codec.layout(tuple(tensor.shape), tensor.dtype)}
    check_parts(codec, out, tuple(tensor.shape), tensor.dtype)
    if part_device(out).type != "cpu" or not all(part.is_contiguous() for part in out.values()):
        raise ValueError(f"codec {codec.name!r}: encode writes into contiguous CPU tensors only")
    return out


def check_segment(codec: Codec, shape: tuple[int, ...], start: int, stop: int) -> int:
    """Check an ``encode_segment`` range; returns the tensor's element count.

    Raises:
        ValueError: the codec has no segments, or the range is not aligned or out of bounds.
    """
    step = codec.segment_numel(shape)
    numel = math.prod(shape)
    if step is None:
        raise ValueError(f"codec {codec.name!r} encodes whole tensors only")
    if not (0 <= start < stop <= numel) or start % step or (stop % step and stop != numel):
        raise ValueError(f"codec {codec.name!r}: segment {start}:{stop} of {numel} elements is not aligned to {step}")
    return numel


def normalize_shape(shape) -> tuple[int, ...]:
    """``shape`` as a tuple of ints.

    Raises:
        ValueError: a dimension is negative or not an integer.
    """
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims) or any(int(d) != d for d in shape):
        raise ValueError(f"shape {tuple(shape)} is not a valid tensor shape (dims must be integers >= 0)")
    return dims


def check_float_dtype(dtype: torch.dtype, what: str = "dtype") -> None:
    """Raise unless ``dtype`` is a floating dtype a codec can encode.

    Raises:
        ValueError: ``dtype`` is not one of bfloat16, float16, float32, float64.
    """
    if dtype not in FLOAT_DTYPES:
        allowed = ", ".join(str(d).replace("torch.", "") for d in FLOAT_DTYPES)
        raise ValueError(f"{what} {dtype} cannot be encoded; allowed: {allowed}")


def check_parts(codec: Codec, parts: dict[str, torch.Tensor], shape, dtype) -> list[PartSpec]:
    """Check that ``parts`` match ``codec.layout(shape, dtype)`` (metadata only, no data read).

    Raises:
        ValueError: a part is missing, or its dtype or shape differs from the layout.
    """
    specs = codec.layout(shape, dtype)
    for spec in specs:
        part = parts.get(spec.name)
        if part is None:
            raise ValueError(f"codec {codec.name!r}: part {spec.name!r} is missing (got {sorted(parts)})")
        if part.dtype != spec.dtype or tuple(part.shape) != spec.shape:
            raise ValueError(
                f"codec {codec.name!r}: part {spec.name!r} is {part.dtype} {tuple(part.shape)}, "
                f"layout wants {spec.dtype} {spec.shape}"
            )
        if not part.is_contiguous():
            raise ValueError(f"codec {codec.name!r}: part {spec.name!r} must be contiguous")
    return specs


def check_out(out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device) -> None:
    """Check the ``out`` argument of ``decode``.

    Raises:
        ValueError: ``out`` has another shape, dtype or device, is not contiguous, or requires grad.
    """
    if out is None:
        return
    if tuple(out.shape) != shape or out.dtype != dtype:
        raise ValueError(f"out is {out.dtype} {tuple(out.shape)}, decode wants {dtype} {shape}")
    if out.device != torch.device(device):
        raise ValueError(f"out is on {out.device}, the parts are on {device}; decode on the parts' device")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    if out.requires_grad:
        raise ValueError("out requires grad; decode frozen weights into a buffer with requires_grad=False")


def part_device(parts: dict[str, torch.Tensor]) -> torch.device:
    """The device of the parts (they must share one).

    Raises:
        ValueError: there are no parts, or they lie on different devices.
    """
    devices = {p.device for p in parts.values()}
    if len(devices) != 1:
        raise ValueError(f"parts must lie on exactly one device, got {sorted(map(str, devices))}")
    return devices.pop()


def rows_per_chunk(row_numel: int, max_chunk_numel: int) -> int:
    """How many rows of ``row_numel`` elements fit in a chunk of ``max_chunk_numel`` (at least 1)."""
    return max(1, max_chunk_numel // max(1, row_numel))


def decode_target(
    codec: Codec, parts: dict[str, torch.Tensor], shape, dtype: torch.dtype, out: torch.Tensor | None
) -> tuple[tuple[int, ...], torch.Tensor]:
    """Check a ``decode`` call and return the normalised shape and the output tensor (``out`` or a new one).

    Raises:
        ValueError: the parts do not match the layout, or ``out`` does not match.
    """
    shape = normalize_shape(shape)
    check_parts(codec, parts, shape, dtype)
    device = part_device(parts)
    check_out(out, shape, dtype, device)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=device)
    return shape, out


DECODE_BACKENDS = ("auto", "torch", "triton")


def check_decode_backend(backend: str) -> None:
    """Raises:
        ValueError: ``backend`` is not one of :data:`DECODE_BACKENDS`.
    """
    if backend not in DECODE_BACKENDS:
        raise ValueError(f"backend {backend!r} is unknown; allowed: {', '.join(DECODE_BACKENDS)}")


class TritonDecode:
    """A codec's Triton decode kernel (module imported on first use), beside its torch decode.

    ``backend="triton"`` always runs it (errors propagate), ``"torch"`` never does, and ``"auto"`` runs
    it on CUDA until it first fails: a kernel that cannot import, build or launch warns once (a missing
    Triton silently) and the torch decode serves the rest of the process.

    Args:
        module: the kernel's module (it imports Triton).
        function: the kernel function's name in ``module``.
        what: the codec's name, for the warning.
    """

    def __init__(self, module: str, function: str, what: str):
        self.module, self.function, self.what = module, function, what
        self.failure: str | None = None

    def wanted(self, backend: str, device: torch.device) -> bool:
        """Whether ``backend`` (checked by :func:`check_decode_backend`) asks for the kernel on ``device``."""
        if backend != "auto":
            return backend == "triton"
        return device.type == "cuda" and self.failure is None

    def run(self, backend: str, *args: object) -> bool:
        """Call the kernel with ``args``; True when it ran (False: use the torch decode)."""
        try:
            getattr(importlib.import_module(self.module), self.function)(*args)
        except Exception as exc:  # import, Triton compile and launch errors have no common base class
            if backend == "triton":
                raise
            self.failure = f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, ImportError):
                warnings.warn(f"streamtune: Triton {self.what} decode failed, using the torch decode: {self.failure}",
                              stacklevel=3)
            return False
        return True
