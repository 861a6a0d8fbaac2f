"""``python -m runtime.serve``: see :mod:`runtime.serve.cli`."""

from runtime.serve.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
