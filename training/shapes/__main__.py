"""`python -m mumu_training.shapes reproduce --out runs/shapes`: see reproduce.py."""

import sys

from .reproduce import main

sys.exit(main())
