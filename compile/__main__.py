"""``kiln compile`` / ``python -m compile`` (which needs ``--store``): see ``compile.openvino``."""

from __future__ import annotations

import sys

from compile.openvino import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
