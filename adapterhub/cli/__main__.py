"""`python -m adapterhub.cli`, as the demo and the tests run it."""

from . import main

main()
