"""What a map leaves behind: ``files`` (the strain-map HDF5 layout), ``frames`` (detector and image frames),
``export`` (HyperSpy and EMD files), ``plots`` (figures)."""
