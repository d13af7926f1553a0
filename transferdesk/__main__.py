"""`python -m transferdesk …`: the same as the `transferdesk` command."""

import sys

from transferdesk.cli.main import main

sys.exit(main())
