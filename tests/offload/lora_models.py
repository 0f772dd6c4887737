
import torch

from streamtune.models.build import build_model

TINY = ["tiny-gemma4", "tiny-qwen3-moe", "tiny-llama", "tiny-mixtral"]


def lora_model(name: str, rank: int = 4, dropout: float = 0.0, experts: bool = False, seed: int = 0):
    """A tiny fp32 model with stock PEFT LoRA on attention/MLP (and optionally fused experts)."""
    import peft

    model, adapter = build_model(name, torch.float32, seed=seed)
    targets = adapter.expert_parameters if experts else ()
    cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout,
                          target_modules=adapter.default_lora_targets,
                          target_parameters=list(targets) or None, init_lora_weights=False)
    torch.manual_seed(seed + 1)
    model = peft.get_peft_model(model, cfg)
    model.train()
    return model, adapter


def batches(num: int, seq_len: int = 24, batch_size: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        ids = torch.randint(3, 1024, (batch_size, seq_len), generator=gen)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


