"""``python -m models.influence ...``: see ``models.influence.cli``."""

import sys

from models.influence.cli import main

sys.exit(main())
