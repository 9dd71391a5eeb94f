"""``python -m hbmplan``: see :mod:`hbmplan.cli`."""

from hbmplan.cli import main

raise SystemExit(main())
