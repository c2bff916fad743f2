"""`python -m medcl_cli` runs the command-line interface."""

from medcl_cli.cli.app import main

if __name__ == "__main__":
    main()
