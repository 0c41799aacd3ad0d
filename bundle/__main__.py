"""``python -m bundle``: see :mod:`bundle.cli`."""

from bundle.cli import main

if __name__ == "__main__":
    main()
