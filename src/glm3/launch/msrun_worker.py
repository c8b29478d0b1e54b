"""What msrun starts on every rank: `glm3 <args>` (a file, because msrun launches scripts, not modules).

This directory holds nothing else, so running the file by path shadows no module.
"""

from glm3.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
