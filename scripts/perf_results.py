#!/usr/bin/env python3
"""Regenerate one docs/perf/<setup>/ folder (every benchmark's CSV, JSON, PNG and
RESULTS.md) in one call; the work is mixcc/results.py's. `--help` lists the options.

    python3 scripts/perf_results.py                   # the setup named from the hardware
    python3 scripts/perf_results.py --setup h200x2-nvlink --quick --budget-s 300
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mixcc.results import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
