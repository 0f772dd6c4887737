"""``python -m streamtune`` (and ``torchrun ... -m streamtune train CONFIG``)."""

import sys

from streamtune.cli import main

sys.exit(main())
