import sys

from nnunet_mtl.cli import main

sys.exit(main())
