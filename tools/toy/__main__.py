import sys

from tools.toy.build import main

sys.exit(main())
