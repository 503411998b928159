"""`python -m analysis.tuning_pays`: the study itself lives in :mod:`sglang_ext.studies.tuning_pays` (the quickstart runs it too)."""

import sys

from sglang_ext.studies.tuning_pays import main

if __name__ == "__main__":
    sys.exit(main())
