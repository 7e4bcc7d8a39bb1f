import sys

from fastdiffinst.cli import main

sys.exit(main())
