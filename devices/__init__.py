"""Device profiles as data: one TOML file per phone, tablet or board, and no code.

This folder installs as `liftedge.devices`. The loader and its validation live in
`liftedge/device.py` (not `liftedge/devices.py`, which would clash with this package).
Adding a device means adding a file here.
"""
