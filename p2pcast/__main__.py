import sys

from p2pcast.cli import main

sys.exit(main())
