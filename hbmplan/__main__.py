"""``python -m hbmplan``: see :mod:`hbmplan.cli`."""

from hbmplan.cli import main

__all__: list[str] = []

raise SystemExit(main())
