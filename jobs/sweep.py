"""`ray job submit -- python jobs/sweep.py -c … -k …`: `mttl sweep` as a Ray job entry point
(the trials run on the cluster)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mttl.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
