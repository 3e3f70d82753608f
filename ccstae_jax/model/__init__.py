"""The model: what is measured from the patterns and the network that reads them.

``geometry`` (zero beam, disk radius, spot spacing, symmetry and the radii derived from them), ``masks`` (pixel
rings and spot disks), ``networks`` (the CC-ST-AE Flax modules and its configuration).
"""
