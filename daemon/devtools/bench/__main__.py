"""`python -m daemon.devtools.bench`: the same command as `lstmd bench`."""

from daemon.devtools.bench.options import main

raise SystemExit(main())
