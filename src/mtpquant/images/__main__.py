"""`python -m mtpquant.images`."""

from mtpquant.images.cli import main

raise SystemExit(main())
