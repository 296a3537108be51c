"""The MATLAB example's walkthrough on the embedded model: python examples/walkthrough.py [OUT_DIR].

The steps, as readable code, are in explainer/walkthrough.py (the same function `explainer
walkthrough` runs)."""
import sys

from explainer.walkthrough import walkthrough

if __name__ == "__main__":
    walkthrough(sys.argv[1] if len(sys.argv) > 1 else "walkthrough")
