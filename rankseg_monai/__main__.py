"""``python -m rankseg_monai``: the ``rankseg-monai`` command line."""

from .app.cli import main

raise SystemExit(main())
