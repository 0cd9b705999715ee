"""liftedge: compile causal LMs with LiftQuant to the byte budget of a phone.

The library API lives in the stage modules (`model`, `calibrate`, `quantize`, `packed`,
`evaluate`, `lattice`); `cli` only parses arguments.
"""

__version__ = "0.1.0"
