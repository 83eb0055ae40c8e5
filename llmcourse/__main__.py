# Hand-written (not exported from a notebook): `python -m llmcourse` runs the command line.
from .cli import main

raise SystemExit(main())
