"""Device benchmark: a LoRA step of the gemma4-26b-a4b preset under a 24 GiB cap, streamtune vs baselines.

    python benchmarks/stream_step.py --tokens 512,2048,8192 --variants streamtune,accelerate,fsdp2

Same as ``streamtune bench``; see ``streamtune.bench.run`` for the options.
"""

import sys

from streamtune.bench.run import main

if __name__ == "__main__":
    sys.exit(main())
