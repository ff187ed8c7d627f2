import sys

from tokenbench.cli import main

sys.exit(main())
