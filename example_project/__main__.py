import sys

from example_project.demo import main

sys.exit(main())
