import sys

from jaxfl.cli import main

sys.exit(main())
