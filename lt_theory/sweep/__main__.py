"""``python -m lt_theory.sweep``: the sweep's command line."""

from lt_theory.sweep.cli import main

if __name__ == "__main__":
    main()
