"""The registry: the eleven published Gemma4 patches (P1-P11) and the entries found since (N1-N5)."""

from __future__ import annotations

import functools

from streamtune.compat import bnb, hf, lazy_device, offload_lora
from streamtune.compat.registry import Entry

INT8_STATE_FIX = "int8-offload-fresh-state"
LORA_FIX = "lora-offloaded-materialise"

FIX_INSTALLERS = {
    INT8_STATE_FIX: bnb.install_int8_offload_state,
    "int8params-kwargs": bnb.install_int8params_kwargs,
    LORA_FIX: offload_lora.install_lora_after_injection,
    "kbit-keep-expert-dtype": hf.install_kbit_keep_experts,
}

_INT8_NOTE = ("compat.apply() wraps accelerate's AlignDevicesHook.post_forward so an offloaded Linear8bitLt gets a "
              "fresh MatmulLtState (CB/SCB released) and the autograd graph keeps the old one intact")
_RETRACTED = ("retracted by its author; the published SCB recomputation CB.abs().amax(1)/127 is identically 1 and "
              "would corrupt weights; real cause: accelerate's offload hook clears module.state.SCB after forward")
_DEVICE_NOTE = "no fix needed where it does not reproduce; maintainers could not reproduce on main"
_LORA_NOTE = ("compat.fix_offloaded_lora(model) after get_peft_model re-creates meta LoRA weights on the hook's "
              "execution device and re-initialises them; compat.apply() runs it after every peft injection")

BNB_ISSUES = "https://github.com/bitsandbytes-foundation/bitsandbytes/issues"
ACCELERATE_HOOKS = "https://github.com/huggingface/accelerate/blob/main/src/accelerate/hooks.py"


def _device(entry_id: str, title: str) -> Entry:
    return Entry(entry_id, title, {"transformers": ">=5.5,<5.6"},
                 ("https://github.com/huggingface/transformers/tree/main/src/transformers/models/gemma4",),
                 functools.partial(lazy_device.reproduce_device, entry_id), fix_note=_DEVICE_NOTE,
                 published_status="patched in site-packages; not reproducible by maintainers on main")


ENTRIES: tuple[Entry, ...] = (
    Entry("P1", "bitsandbytes Int8Params pre-quantized path (offloaded int8 backward)", {"bitsandbytes": ""},
          (BNB_ISSUES, ACCELERATE_HOOKS), bnb.reproduce_offloaded_int8_backward, INT8_STATE_FIX, "patch",
          _INT8_NOTE, _RETRACTED),
    Entry("P2", "int8 backward guard when SCB is None", {"bitsandbytes": "", "accelerate": ""},
          (BNB_ISSUES, ACCELERATE_HOOKS), bnb.reproduce_offloaded_int8_backward, INT8_STATE_FIX, "patch",
          _INT8_NOTE, _RETRACTED),
    Entry("P3", "getattr(weight, 'SCB', None) on the meta device", {"bitsandbytes": "<0.50.0"},
          ("https://github.com/bitsandbytes-foundation/bitsandbytes/releases/tag/0.50.0",),
          bnb.reproduce_meta_scb, fix_note="fixed upstream in bitsandbytes 0.50.0: upgrade",
          published_status="patched in site-packages"),
    _device("P4", "Gemma4 RoPE cos/sin on CPU while q/k on the GPU (device_map offload)"),
    _device("P5", "position_ids / attention_mask not on hidden_states.device (device_map offload)"),
    _device("P6", "SDPA attention_mask not on the query's device (device_map offload)"),
    _device("P7", "layer_scalar on the wrong device (device_map offload)"),
    Entry("P8", "peft LoRA on an offloaded layer: LoRA and base output on different devices",
          {"peft": "", "accelerate": ""}, ("https://github.com/huggingface/peft/issues",),
          offload_lora.reproduce_lora_on_offloaded, LORA_FIX, "patch", _LORA_NOTE,
          "patched in site-packages; live today as the 'expected device meta' backward error"),
    Entry("P9", "restore SCB on gradient-checkpoint recompute", {"bitsandbytes": "", "accelerate": ""},
          (BNB_ISSUES, ACCELERATE_HOOKS), bnb.reproduce_offloaded_int8_backward, INT8_STATE_FIX, "patch",
          _INT8_NOTE, _RETRACTED),
    Entry("P10", "mm_token_type_ids required for text-only training", {"transformers": "<5.6"},
          ("https://github.com/huggingface/transformers/releases/tag/v5.6.0",), hf.reproduce_mm_token_type_ids,
          fix_note="fixed upstream in transformers 5.6: upgrade", published_status="patched in site-packages"),
    Entry("P11", "Int8Params.__new__ rejects the **kwargs transformers 5 passes",
          {"bitsandbytes": "<0.50.0", "accelerate": "<1.14.0"},
          ("https://github.com/bitsandbytes-foundation/bitsandbytes/releases/tag/0.50.0",
           "https://github.com/huggingface/accelerate/releases/tag/v1.14.0"),
          bnb.reproduce_int8params_kwargs, "int8params-kwargs", "patch",
          "compat.apply() wraps Int8Params.__new__ to drop keyword arguments it does not accept",
          "patched in site-packages; fixed in bitsandbytes 0.50.0 / accelerate 1.14.0"),
    Entry("N1", "get_peft_model on an offloaded model creates the offloaded layers' LoRA weights on meta",
          {"peft": "", "accelerate": ""}, ("https://github.com/huggingface/peft/issues",),
          offload_lora.reproduce_lora_on_offloaded, LORA_FIX, "patch", _LORA_NOTE),
    Entry("N2", "LoRA applied before dispatch: offloaded LoRA weights are offloaded too and never train",
          {"peft": "", "accelerate": ""}, (ACCELERATE_HOOKS,), offload_lora.reproduce_lora_before_dispatch,
          "fix_offloaded_lora", "helper",
          "call compat.fix_offloaded_lora(model) after dispatch (before building the optimizer): it removes the "
          "LoRA modules' offload hooks and keeps their weights resident on the execution device"),
    Entry("N3", "an offloaded Linear8bitLt keeps its int8 matrix on the execution device (state.CB)",
          {"bitsandbytes": "", "accelerate": ""}, (ACCELERATE_HOOKS,), bnb.reproduce_int8_cb_kept,
          INT8_STATE_FIX, "patch", _INT8_NOTE),
    Entry("N4", "int8 autograd keeps activations on ctx: non-reentrant checkpointing cannot free them",
          {"bitsandbytes": ""}, ("https://github.com/bitsandbytes-foundation/bitsandbytes/blob/main/bitsandbytes/"
                                 "autograd/_functions.py",), bnb.reproduce_int8_ctx_activations,
          fix_note="no in-memory fix: needs save_for_backward upstream; workaround: use_reentrant=True checkpointing"),
    Entry("N5", "prepare_model_for_kbit_training upcasts unquantized bf16 experts to fp32", {"peft": ""},
          ("https://github.com/huggingface/peft/blob/main/src/peft/utils/other.py",),
          hf.reproduce_kbit_upcasts_experts, "kbit-keep-expert-dtype", "patch",
          "compat.apply() wraps peft.prepare_model_for_kbit_training to return 3-D (fused expert) parameters to "
          "their dtype; code that imported the function before apply() keeps the original"),
)


def by_id() -> dict[str, Entry]:
    return {entry.id: entry for entry in ENTRIES}
