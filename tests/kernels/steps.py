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
