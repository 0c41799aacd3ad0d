"""``python -m bundle``: see :mod:`bundle.integrations.cli`."""

from bundle.integrations.cli import main

if __name__ == "__main__":
    main()
