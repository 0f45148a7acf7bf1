"""``python -m bench``: run every benchmark in this folder."""

from bench.ask import main

main()
