"""``python -m robop_lightning.assets``: list and fetch the embedded assets."""

import sys

from robop_lightning.assets import main

sys.exit(main())
