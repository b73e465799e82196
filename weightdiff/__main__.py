"""``python -m weightdiff`` runs the command-line interface."""

from weightdiff.cli import main

if __name__ == "__main__":
    main()
