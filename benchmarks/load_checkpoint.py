"""Load a saved (random) checkpoint into the engine at each codec: GB/s and peak host RAM.

    python benchmarks/load_checkpoint.py --dir /data/g4 --codecs bf16,int8,nf4 --cache-dir /data/packs

See ``streamtune.bench.load``.
"""

import sys

from streamtune.bench.load import main

if __name__ == "__main__":
    sys.exit(main())
