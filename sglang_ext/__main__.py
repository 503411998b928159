import sys

from sglang_ext.cli import main

sys.exit(main())
