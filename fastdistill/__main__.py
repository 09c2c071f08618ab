"""``python -m fastdistill``: the command line (see :mod:`fastdistill.cli`)."""
from .cli import main

raise SystemExit(main())
