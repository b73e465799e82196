"""``python -m weightdiff`` runs the command-line interface."""

from weightdiff.cli import run

if __name__ == "__main__":
    run()
