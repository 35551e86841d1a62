"""`python -m etl` is the same program as the `trakt-etl` console script."""

from etl.cli import main

raise SystemExit(main())
