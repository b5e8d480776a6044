"""`python -m zoocli` is the `zoo` command."""

from zoocli.cli import main

if __name__ == "__main__":
    main()
