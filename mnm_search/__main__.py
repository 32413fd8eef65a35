"""`python -m mnm_search` runs the `mnm` command line."""

from mnm_search.cli import main

main()
