import sys

from .run import main

if __name__ == "__main__":  # spawned timing processes (isolated.py) import this module too
    sys.exit(main())
