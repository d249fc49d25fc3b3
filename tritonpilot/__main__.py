import sys

from tritonpilot.cli import main

sys.exit(main())
