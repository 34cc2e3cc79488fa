"""``python -m attnsurgery`` (also what ``accelerate launch -m attnsurgery lm-eval ...`` runs)."""

import sys

from .cli import main

sys.exit(main())
