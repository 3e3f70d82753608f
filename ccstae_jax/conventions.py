"""The frames, signs and names every file, table and figure of ccstae-jax uses.

One source for them: the simulator's labels, the strain maps, the py4DSTEM baseline's maps and the CLI help all
describe their arrays with the sentences below, and name their maps with `QUANTITIES`.
"""

#: The four maps of a strain result, in file order: dimensionless strain and shear, rotation in radians.
QUANTITIES = ("strain_xx", "strain_yy", "shear_xy", "rotation")

#: The three components of the symmetric strain tensor eps = [[strain_xx, shear_xy], [shear_xy, strain_yy]].
STRAIN_KEYS = QUANTITIES[:3]

#: Array axes and the physics frame.
FRAME = ("4D data (Rx, Ry, Qx, Qy): scan row, scan column, detector row, detector column; x = detector Qx = axis 2 "
         "(pattern rows), y = Qy = axis 3 (pattern columns)")

#: What the numbers mean and their signs.
STRAIN = ("strain_xx/strain_yy = real-space lattice strain along x/y (positive = lattice stretched, spots move "
          "inward); shear_xy = tensor shear, eps = [[strain_xx, shear_xy], [shear_xy, strain_yy]]; rotation "
          "counter-clockwise from +Qx toward +Qy")
