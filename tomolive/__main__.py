"""`python -m tomolive` is the `tomolive` command."""

from tomolive.daemon.cli import main

raise SystemExit(main())
