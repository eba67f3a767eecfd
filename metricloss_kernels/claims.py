"""`python -m metricloss_kernels.claims`, the command that earlier committed results cite: the same as
`python -m metricloss_kernels claims` (metricloss_kernels.experiments.claims)."""
import sys

from .experiments.claims import main

if __name__ == "__main__":
    sys.exit(main())
