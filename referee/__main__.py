"""python -m referee: the referee's run (referee/replicate.py); under torchrun, one rank of it."""

from referee import replicate

replicate.main()
