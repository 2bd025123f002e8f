"""``python -m byoc_demo [DIR]`` runs the demo scenario (what ``make demo`` does)."""

import sys

from byoc_demo.scenario import main

raise SystemExit(main(sys.argv[1:]))
