"""``python -m eval METRIC ...``: the evaluation commands without the tmot front end."""

from .cli import main

raise SystemExit(main())
