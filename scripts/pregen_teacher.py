"""Thin wrapper: the logic lives in `vgrout.pregen` (see its docstring)."""

from vgrout.pregen import main

if __name__ == "__main__":
    raise SystemExit(main())
