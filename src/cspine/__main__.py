"""`python -m cspine <stage>`: see `cspine.cli`."""

from cspine.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
