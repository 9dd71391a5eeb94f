"""The capacity frontier: a byte model of a training step, model presets, calibration, and
:func:`frontier` (the longest prompt each schedule trains within an HBM budget)."""
