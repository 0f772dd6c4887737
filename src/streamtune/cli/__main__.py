import sys

from streamtune.cli import main

sys.exit(main())
