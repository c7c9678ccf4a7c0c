import sys

from spheregen.cli import main

sys.exit(main())
