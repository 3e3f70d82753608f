"""Mapping a scan with a trained run: ``predict`` (encode every pattern, re-estimate the bases, fit each warp),
``fit`` (the per-pattern Poisson forward-model fit), ``bases`` (the bases from the aligned patterns), ``reference``
(validity, referencing to a region, detector distortion, per-position errors)."""
