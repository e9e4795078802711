"""`ray job submit -- python jobs/finetune.py -c … -k …`: `mttl finetune` as a Ray job entry point."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mttl.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
