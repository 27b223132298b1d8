import sys

from effkern.cli import main

sys.exit(main())
