#!/usr/bin/env python3
"""Generate text with specoff; `python tools/generate.py --help` lists the options."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a checkout too

from specoff.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
