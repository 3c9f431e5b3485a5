"""`python -m pictrace ...`"""

from pictrace.cli import main

raise SystemExit(main())
