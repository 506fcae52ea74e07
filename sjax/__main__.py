import sys

from sjax.cli import main

sys.exit(main())
