"""`python -m analysis.workload_shift`: the study itself lives in :mod:`sglang_ext.studies.workload_shift` (the quickstart runs it too)."""

import sys

from sglang_ext.studies.workload_shift import main

if __name__ == "__main__":
    sys.exit(main())
