"""Device benchmarks (``streamtune bench``): link speeds and a streamed LoRA step against baselines."""
