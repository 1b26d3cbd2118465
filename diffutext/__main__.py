"""python -m diffutext: the command line."""

from diffutext.cli import main

if __name__ == "__main__":
    main()
