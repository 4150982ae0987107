"""``python -m robop_lightning``: the ``robop-prune`` command (:mod:`robop_lightning.cli`)."""

from robop_lightning.cli import main

if __name__ == "__main__":
    main()
