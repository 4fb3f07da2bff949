"""``python -m raymix.bench``."""

import sys

from raymix.bench import main

sys.exit(main())
