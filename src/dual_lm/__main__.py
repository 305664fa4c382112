"""``python -m dual_lm`` is the ``dual-lm`` command."""

from dual_lm.cli import main

raise SystemExit(main())
