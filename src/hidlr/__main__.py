import sys

from hidlr.cli import main

sys.exit(main())
