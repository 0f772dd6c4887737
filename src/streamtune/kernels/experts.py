"""Expert LoRA as its own grouped low-rank product, with routing that never waits on the host.

PEFT's ``target_parameters`` (``ParamWrapper``) adapts a fused expert parameter ``W [E, out, in]``
by registering a parametrization that rebuilds ``W + scale * B_e @ A_e`` for every expert on every
forward (a second copy of the whole expert stack, ~1.5 GB per layer of the 26B preset; and
``register_parametrization`` evaluates it once more to check its shape). Here the experts module
computes, for the tokens sorted by expert, ``x @ W_e^T`` from the frozen weight as it is bound at
call time (the engine may have just decoded it into a workspace) plus
``scale * (x @ A_e^T) @ B_e^T`` as two grouped products of rank ``r``: the merged weight never
exists. The LoRA tensors stay PEFT's parameters (names, shapes, init): adapters are unchanged.

Routing is sort + ``searchsorted`` offsets on the device: no ``nonzero``, ``.item()``,
``tolist`` or per-expert Python loop on the ``grouped_mm`` route (the stock ``eager`` experts
implementation syncs once per hit expert, its ``grouped_mm`` fallback once per product).
The ``loop`` route (CPU, or CUDA without ``torch._grouped_mm``) reads the offsets once per product.
"""

from __future__ import annotations

import types
import warnings
from typing import Any

import torch

from streamtune.kernels.binding import unbind_forwards
from streamtune.kernels.compiling import CompileFallback
from streamtune.kernels.counters import count

_PATCH_FLAG = "_streamtune_fast_expert_lora"
_PLAIN_FLAG = "_streamtune_fast_experts"  # on an experts module without LoRA: its route
_COMBINE_FLAG = "_streamtune_compile_combine"
ROUTES = ("grouped_mm", "loop")
# grouped_mm needs 16-byte aligned strides: the rank is zero-padded to a multiple of this (bf16).
_RANK_MULTIPLE = 8
# Fused expert parameters this forward knows how to compute (transformers' experts interface).
_EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj")


class _ContiguousGrad(torch.autograd.Function):
    """Identity forward; makes the incoming gradient contiguous (``_grouped_mm``'s backward needs it)."""

    @staticmethod
    def forward(ctx: Any, x: Any) -> Any:
        return x

    @staticmethod
    def backward(ctx: Any, grad: Any) -> Any:
        return grad.contiguous()


class _GatherPermuted(torch.autograd.Function):
    """``rows.index_select(0, index)`` for a permutation ``index``, whose backward is the gather by ``inverse``.

    Problem: autograd's backward of an ``index_select`` is an ``index_add`` (atomic adds: the rows could repeat);
    on the 26B preset at 8192 tokens it took 1.5 ms per experts call for [65536, 2816] bf16 rows, three times the
    gather. Solution: a permutation's rows never repeat, so its gradient is the gather by the inverse permutation.
    """

    @staticmethod
    def forward(ctx: Any, rows: Any, index: Any, inverse: Any) -> Any:
        ctx.save_for_backward(inverse)
        return rows.index_select(0, index)

    @staticmethod
    def backward(ctx: Any, grad: Any) -> Any:
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class _ExpandTokens(torch.autograd.Function):
    """Each routed row's token: ``hidden.index_select(0, perm // k)``; the backward sums each token's ``k`` rows
    as a gather by ``inverse`` and a sum over ``k`` (no atomic ``index_add``, see :class:`_GatherPermuted`)."""

    @staticmethod
    def forward(ctx: Any, hidden: Any, perm: Any, inverse: Any, num_top_k: int) -> Any:
        ctx.save_for_backward(inverse)
        ctx.num_top_k = num_top_k
        return hidden.index_select(0, perm // num_top_k)

    @staticmethod
    def backward(ctx: Any, grad: Any) -> Any:
        (inverse,) = ctx.saved_tensors
        rows = grad.index_select(0, inverse)
        return rows.view(-1, ctx.num_top_k, rows.shape[-1]).sum(dim=1), None, None, None


def route(top_k_index: Any, num_experts: int) -> tuple[Any, Any, Any]:
    """Sort the ``(token, k)`` pairs by expert on the device.

    Args:
        top_k_index: ``[tokens, k]`` expert ids.
        num_experts: ``E``.

    Returns:
        ``(sorted_ids [S], perm [S], offsets [E] int32)``: ``perm // k`` is each sorted row's token;
        ``offsets[e]`` is the end of expert ``e``'s rows (cumulative counts).
    """
    sorted_ids, perm = torch.sort(top_k_index.reshape(-1), stable=True)
    bounds = torch.arange(1, num_experts + 1, device=sorted_ids.device, dtype=sorted_ids.dtype)
    offsets = torch.searchsorted(sorted_ids, bounds).to(torch.int32)
    return sorted_ids, perm, offsets


def _grouped_kernel(x: Any, weight: Any, offsets: Any) -> Any:
    fn = getattr(torch.nn.functional, "grouped_mm", None)
    out = fn(x, weight, offs=offsets) if fn is not None else torch._grouped_mm(x, weight, offs=offsets)
    return _ContiguousGrad.apply(out)


def grouped_matmul(x: Any, weight: Any, offsets: Any, use_kernel: bool) -> Any:
    """Rows of ``x`` (sorted by expert) times their expert's ``weight[e]``: ``[S, in] x [E, in, out]``.

    ``use_kernel``: one ``torch._grouped_mm`` (no host sync); otherwise a loop over the experts
    that reads ``offsets`` once (exact, any device and dtype).
    """
    if use_kernel:
        return _grouped_kernel(x, weight, offsets)
    pieces, start = [], 0
    for expert, end in enumerate(offsets.tolist()):
        if end > start:
            pieces.append(x[start:end] @ weight[expert])
        start = end
    if not pieces:
        return x.new_zeros(x.shape[0], weight.shape[-1])
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def lora_factors(wrapper: Any, adapter: str, dtype: Any) -> tuple[Any, Any, float]:
    """``(A [E, r, in], B [E, out, r], scale)`` of a PEFT ``ParamWrapper`` in ``dtype``.

    PEFT stores ``lora_A.weight`` as ``[E*r, in]`` (expert-major rows) and ``lora_B.weight`` as
    ``[out, r*E]`` (expert-minor columns); the delta of expert ``e`` is ``B_e @ A_e`` in the
    ``[out, in]`` orientation of a weight used as ``x @ W_e^T``.
    """
    num_experts = wrapper.num_experts
    weight_a = wrapper.lora_A[adapter].weight
    weight_b = wrapper.lora_B[adapter].weight
    factor_a = weight_a.to(dtype).reshape(num_experts, -1, weight_a.shape[-1])
    factor_b = weight_b.to(dtype).reshape(weight_b.shape[0], -1, num_experts).permute(2, 0, 1).contiguous()
    return factor_a, factor_b, wrapper.scaling[adapter]


def low_rank(x: Any, factors: list[tuple[Any, Any, float]], offsets: Any, use_kernel: bool) -> Any:
    """``sum over adapters of scale * (x @ A_e^T) @ B_e^T`` for sorted rows, as grouped products."""
    total = None
    for factor_a, factor_b, scale in factors:
        rank = factor_a.shape[1]
        if use_kernel and rank % _RANK_MULTIPLE:
            pad = _RANK_MULTIPLE - rank % _RANK_MULTIPLE
            factor_a = torch.nn.functional.pad(factor_a, (0, 0, 0, pad))
            factor_b = torch.nn.functional.pad(factor_b, (0, pad))
        reduced = grouped_matmul(x, factor_a.transpose(-2, -1), offsets, use_kernel) * scale
        update = grouped_matmul(reduced, factor_b.transpose(-2, -1), offsets, use_kernel)
        total = update if total is None else total + update
    return total


def _project(experts: Any, name: str, x: Any, sorted_ids: Any, offsets: Any, lora: dict, use_kernel: bool) -> Any:
    """``x @ W_e^T (+ bias_e) + low-rank update`` for the fused parameter ``name``, sorted rows."""
    weight = getattr(experts, name)  # read now: the engine binds streamed weights just before the forward
    weight = weight if getattr(experts, "is_transposed", False) else weight.transpose(-2, -1)
    out = grouped_matmul(x.to(weight.dtype), weight, offsets, use_kernel)
    if getattr(experts, "has_bias", False):
        out = out + getattr(experts, f"{name}_bias").index_select(0, sorted_ids)
    if name in lora:
        out = out + low_rank(x.to(out.dtype), lora[name], offsets, use_kernel).to(out.dtype)
    return out


def _gate(experts: Any, gate_up: Any) -> Any:
    if hasattr(experts, "_apply_gate"):
        return experts._apply_gate(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def experts_forward(experts: Any, hidden_states: Any, top_k_index: Any, top_k_weights: Any,
                    lora: dict[str, list[tuple[Any, Any, float]]], use_kernel: bool,
                    compile_combine: bool = False) -> Any:
    """A fused-experts module's forward with LoRA on its parameters as separate low-rank products.

    Args:
        experts: a transformers experts module (3-D ``gate_up_proj``/``up_proj`` and ``down_proj``).
        hidden_states: ``[tokens, hidden]``.
        top_k_index: ``[tokens, k]`` expert ids; top_k_weights: ``[tokens, k]`` routing weights.
        lora: parameter name -> ``[(A, B, scale), ...]`` (see :func:`lora_factors`).
        use_kernel: grouped products through ``torch._grouped_mm``.
        compile_combine: the routing-weighted sum back to token order as one compiled kernel.

    Returns:
        ``[tokens, hidden]`` in ``hidden_states.dtype`` (routing sum in the weights' dtype, as in
        transformers' ``grouped_mm`` implementation).
    """
    num_tokens, num_top_k = top_k_index.shape
    sorted_ids, perm, offsets = route(top_k_index, experts.num_experts)
    inverse = torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))
    x = _ExpandTokens.apply(hidden_states, perm, inverse, num_top_k)
    has_gate = getattr(experts, "has_gate", True)
    up_name = "gate_up_proj" if has_gate else "up_proj"
    proj = _project(experts, up_name, x, sorted_ids, offsets, lora, use_kernel)
    proj = _gate(experts, proj) if has_gate else experts.act_fn(proj)
    proj = _project(experts, "down_proj", proj, sorted_ids, offsets, lora, use_kernel)
    return _combine(proj, top_k_weights, inverse, perm, compile_combine).to(hidden_states.dtype)


def combine_routed(proj: Any, top_k_weights: Any, inverse: Any, perm: Any | None = None) -> Any:
    """Each token's sum over its ``k`` experts of routing weight x expert output.

    Args:
        proj: ``[S, hidden]`` expert outputs, rows sorted by expert.
        top_k_weights: ``[tokens, k]`` routing weights.
        inverse: ``[S]``: the sorted row of each ``(token, k)`` pair, in token-major order.
        perm: ``[S]``: the inverse permutation of ``inverse`` (given: the backward gathers instead of scattering).

    Returns:
        ``[tokens, hidden]`` in the promoted dtype of ``proj`` and the weights (as transformers' ``grouped_mm``
        experts implementation: the weights multiply before the rows return to token order).
    """
    num_tokens, num_top_k = top_k_weights.shape
    rows = proj.index_select(0, inverse) if perm is None else _GatherPermuted.apply(proj, inverse, perm)
    gathered = rows.view(num_tokens, num_top_k, -1)
    return (gathered * top_k_weights.unsqueeze(-1)).sum(dim=1)


def _compiled_combine() -> Any:
    """:func:`combine_routed` compiled once per process.

    Problem: eagerly, the combine writes and reads the ``[S, hidden]`` rows three times in fp32 (the weighted
    product, the gather back to token order, the sum): about 3.5 GB of memory traffic per experts call of the 26B
    preset at 8192 tokens (S = 8 x 8192 rows of 2816). Solution: one compiled gather-multiply-sum that reads the
    bf16 rows once and writes ``[tokens, hidden]``.
    """
    if "combine" not in _COMPILED:
        from streamtune.kernels.compiling import compile_fn

        _COMPILED["combine"] = compile_fn(combine_routed, dynamic=True)
    return _COMPILED["combine"]


_COMPILED: dict[str, Any] = {}
COMBINE_FALLBACK = CompileFallback("the experts' combine", "it runs uncompiled from now on")


def _combine(proj: Any, top_k_weights: Any, inverse: Any, perm: Any, compiled: bool) -> Any:
    """:func:`combine_routed`, compiled when asked; on a compile failure warn once and run it eagerly from then on
    (inside a compiled region it is traced into the region's graph)."""
    if compiled and not torch.compiler.is_compiling():
        return COMBINE_FALLBACK.run(_run_compiled_combine, combine_routed, proj, top_k_weights, inverse, perm)
    return combine_routed(proj, top_k_weights, inverse, perm)


def _run_compiled_combine(*args: Any) -> Any:
    return _compiled_combine()(*args)


def _chain(wrapper: Any) -> tuple[list[Any], Any]:
    """The nested ``ParamWrapper``s from ``wrapper`` inwards, and the experts module they wrap."""
    from peft.tuners.lora.layer import ParamWrapper

    chain, module = [], wrapper
    while isinstance(module, ParamWrapper):
        chain.append(module)
        module = module.base_layer
    return chain, module


def _supported(experts: Any, chain: list[Any]) -> bool:
    """Experts this forward computes exactly what the stock module + PEFT compute."""
    params = dict(experts.named_parameters(recurse=False))
    return (hasattr(experts, "num_experts") and "down_proj" in params
            and all(w.parameter_name in _EXPERT_PARAMS and w.num_experts == experts.num_experts for w in chain)
            and not getattr(experts, "has_post_expert_norm", False)
            and not getattr(experts, "_is_expert_parallel", False))


def _collect_lora(chain: list[Any], dtype: Any) -> dict[str, list[tuple[Any, Any, float]]] | None:
    """LoRA factors per parameter name, or None where PEFT's own path must run (merged, disabled)."""
    lora: dict[str, list[tuple[Any, Any, float]]] = {}
    for wrapper in chain:
        if wrapper.disable_adapters or wrapper.merged:
            return None
        for adapter in wrapper.active_adapters:
            if adapter in wrapper.lora_A:
                lora.setdefault(wrapper.parameter_name, []).append(lora_factors(wrapper, adapter, dtype))
    return lora


# why torch._grouped_mm was given up for this process (empty: it has not failed)
_GROUPED_MM_FAILURE: list[str] = []


def _use_kernel(route_name: str, x: Any) -> bool:
    if route_name != "grouped_mm" or not hasattr(torch, "_grouped_mm") or _GROUPED_MM_FAILURE:
        return False
    return x.device.type != "cuda" or x.dtype == torch.bfloat16


def fast_expert_lora_forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    """Bound to the outermost ``ParamWrapper`` of an experts module: :func:`experts_forward`."""
    chain, experts = _chain(self)
    lora = _collect_lora(chain, x.dtype) if len(args) == 2 and not kwargs else None
    if lora is None:
        return type(self).forward(self, x, *args, **kwargs)
    count("expert_lora")
    return _routed_forward(experts, x, args[0], args[1], lora, getattr(self, _PATCH_FLAG),
                           getattr(self, _COMBINE_FLAG, False), "expert_lora")


def _routed_forward(experts: Any, x: Any, top_k_index: Any, top_k_weights: Any, lora: dict, route_name: str,
                    compile_combine: bool, counter: str) -> Any:
    """:func:`experts_forward` through ``torch._grouped_mm`` where it runs, else (or after it failed) the loop."""
    if _use_kernel(route_name, x):
        try:
            out = experts_forward(experts, x, top_k_index, top_k_weights, lora, True, compile_combine)
            count(f"{counter}_grouped_mm")
            return out
        except RuntimeError as exc:  # a torch build or card whose grouped_mm refuses these shapes/dtypes
            _GROUPED_MM_FAILURE.append(f"{type(exc).__name__}: {str(exc)[:200]}")
            warnings.warn(f"streamtune: torch._grouped_mm failed for the experts ({_GROUPED_MM_FAILURE[0]}); "
                          "using the per-expert loop from now on", RuntimeWarning, stacklevel=2)
    count(f"{counter}_loop")
    return experts_forward(experts, x, top_k_index, top_k_weights, lora, False, compile_combine)


def fast_experts_forward(self: Any, hidden_states: Any, top_k_index: Any, top_k_weights: Any) -> Any:
    """Bound to an experts module without LoRA on its parameters: :func:`experts_forward` with no low-rank
    part (sort routing without host syncs, and the compiled combine)."""
    count("fast_experts")
    return _routed_forward(self, hidden_states, top_k_index, top_k_weights, {}, getattr(self, _PLAIN_FLAG),
                           getattr(self, _COMBINE_FLAG, False), "fast_experts")


def use_fast_experts(model: Any, route_name: str) -> int:
    """Bind :func:`fast_experts_forward`, with the compiled combine, to every fused-experts module that PEFT does
    not wrap (no ``lora.target_parameters`` on it), and turn the compiled combine on for the wrapped ones.

    Returns:
        The number of experts modules without LoRA patched.

    Raises:
        ValueError: unknown ``route_name``.
    """
    if route_name not in ROUTES:
        raise ValueError(f"use_fast_experts: route {route_name!r} is not one of {', '.join(ROUTES)}")
    from peft.tuners.lora.layer import ParamWrapper

    wrapped = set()
    for wrapper in (m for m in model.modules() if isinstance(m, ParamWrapper)):
        _, experts = _chain(wrapper)
        wrapped.add(id(experts))
        setattr(wrapper, _COMBINE_FLAG, True)
    patched = 0
    for module in model.modules():
        if id(module) in wrapped or isinstance(module, ParamWrapper) or not _supported(module, []):
            continue
        if getattr(module, "gate_up_proj", None) is None and getattr(module, "up_proj", None) is None:
            continue
        module.forward = types.MethodType(fast_experts_forward, module)
        setattr(module, _PLAIN_FLAG, route_name)
        setattr(module, _COMBINE_FLAG, True)
        patched += 1
    return patched


def restore_stock_experts(model: Any) -> None:
    """Undo :func:`use_fast_experts` (transformers' experts forward again, PEFT's combine for wrapped ones)."""
    unbind_forwards(model.modules(), _PLAIN_FLAG)
    for module in model.modules():
        if getattr(module, _COMBINE_FLAG, False):
            setattr(module, _COMBINE_FLAG, False)


def use_fast_expert_lora(model: Any, route_name: str) -> int:
    """Bind :func:`fast_expert_lora_forward` to each experts module's outermost PEFT ``ParamWrapper``.

    Args:
        model: a PEFT model (``lora.target_parameters`` on fused experts, or none).
        route_name: ``grouped_mm`` (``torch._grouped_mm`` where it runs, bf16 on CUDA) or ``loop``.

    Returns:
        The number of experts modules patched (0 when no fused expert parameter has LoRA).

    Raises:
        ValueError: unknown ``route_name``.
    """
    if route_name not in ROUTES:
        raise ValueError(f"use_fast_expert_lora: route {route_name!r} is not one of {', '.join(ROUTES)}")
    from peft.tuners.lora.layer import ParamWrapper

    wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper)]
    inner = {id(w.base_layer) for w in wrappers}
    patched = 0
    for wrapper in wrappers:
        chain, experts = _chain(wrapper)
        if id(wrapper) in inner or not _supported(experts, chain):
            continue
        if not getattr(wrapper, _PATCH_FLAG, None):
            patched += 1
        wrapper.forward = types.MethodType(fast_expert_lora_forward, wrapper)
        setattr(wrapper, _PATCH_FLAG, route_name)
    return patched


def restore_stock_expert_lora(model: Any) -> None:
    """Undo :func:`use_fast_expert_lora` (PEFT's ``ParamWrapper`` forward again)."""
    unbind_forwards(model.modules(), _PATCH_FLAG)
