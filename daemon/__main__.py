"""`python -m daemon` is the `lstmd` console script."""

from daemon.cli import main

raise SystemExit(main())
