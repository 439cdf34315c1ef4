import sys

from dromo_ray.cli.main import main

sys.exit(main())
