import sys

from diffalign.toy.build import main

sys.exit(main())
