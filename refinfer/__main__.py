"""`python -m refinfer` is the `refinfer` command."""

from refinfer.cli import main

raise SystemExit(main())
