"""`python -m mttl.cli …`: the `mttl` command."""

import sys

from mttl.cli import main

sys.exit(main())
