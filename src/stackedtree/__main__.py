"""`python -m stackedtree`: the `stackedtree` command."""

from stackedtree.cli import main

raise SystemExit(main())
