import sys

from dcal.check.cli import main

sys.exit(main())
