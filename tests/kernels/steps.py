"""A labelled batch and one loss/gradient evaluation, shared by the kernel tests."""

import torch

from streamtune.train.loss import count_valid_tokens, lm_loss_sum


def labelled_batch(vocab, seq=24):
    """Two rows of random ids; the first five labels of row 0 are ignored (-100)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, seq), generator=gen)
    labels = ids.clone()
    labels[0, :5] = -100
    return {"input_ids": ids, "labels": labels}


def loss_and_grads(model, adapter, batch, kernels=None):
    """Mean token loss (chunks of 7) and the gradient of every trainable parameter."""
    model.zero_grad(set_to_none=True)
    loss = lm_loss_sum(model, adapter, batch, 7, kernels) / count_valid_tokens(batch["labels"])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def perturb_for_checks(model, seed=7):
    """Random LoRA B (so adapters change outputs) and frozen expert weights x20 (expert outputs well above
    rounding, so a wrong expert path shows in the loss)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            elif "experts" in name and not p.requires_grad:
                p.mul_(20)



def lora_model(name, device="cpu", rank=4):
    """A tiny preset in fp32 with LoRA (alpha 2 x rank) whose B is random (so adapters change outputs)."""
    from streamtune.config import LoraConfig
    from streamtune.lora import attach_lora
    from streamtune.models.build import build_model

    model, adapter = build_model(name, torch.float32, seed=1)
    model = attach_lora(model, adapter, LoraConfig(rank=rank, alpha=2 * rank), seed=0).to(device)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.normal_(0, 0.05)
    return model, adapter
