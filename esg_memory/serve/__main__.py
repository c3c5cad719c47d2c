"""``python -m esg_memory.serve``: the service's command line (the Dockerfile's entry point)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
