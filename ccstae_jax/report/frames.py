"""Strain in the detector frame and in the real-space image frame, and how a strain-map file records them.

Frames (both right-handed in the same sense, x toward y counter-clockwise as displayed with x down the rows):

* **detector frame**: x = detector Qx = pattern rows (data axis 2), y = Qy = pattern columns (axis 3). `ccstae map`
  computes every map in this frame.
* **image frame**: x = the scan's row axis (data axis 0, Rx, down the image), y = its column axis (axis 1, Ry).

``scan_rotation`` (degrees; ``ccstae map --scan-rotation``) is the angle, counter-clockwise (from +x toward +y), from
the image frame's +x axis (the scan's row direction) to the direction in the image that the detector's +Qx axis
corresponds to. A real-space direction with detector-frame components ``v_d`` has image-frame components
``v_i = R(phi) v_d``, ``R(phi) = [[cos phi, -sin phi], [sin phi, cos phi]]``, and a tensor turns as
``eps_i = R eps_d R^T``::

    strain_xx' = c^2 exx - 2 c s exy + s^2 eyy
    strain_yy' = s^2 exx + 2 c s exy + c^2 eyy
    shear_xy'  = c s (exx - eyy) + (c^2 - s^2) exy          (c = cos phi, s = sin phi)

The rotation map (an in-plane rotation relative to the reference) is the same in both frames, as 2-D rotations
commute: ``R (I + eps) R(theta) R^T = (I + R eps R^T) R(theta)``. A mirror between scan and detector (a flipped
camera) is not a rotation: read the data with ``--transpose 0 1 3 2`` to swap Qx and Qy first, then find the angle.
"""
from __future__ import annotations

import json

import numpy as np

from ccstae_jax.conventions import STRAIN_KEYS

__all__ = ["FRAME_DESCRIPTIONS", "rotate_strain", "image_frame_maps", "frame_attrs"]

FRAME_DESCRIPTIONS = {
    "detector": "x = detector Qx = pattern rows (data axis 2), y = Qy = pattern columns (axis 3)",
    "image": "x = scan row axis Rx (data axis 0, down the image), y = scan column axis Ry (axis 1); tensors turned "
             "by scan_rotation_deg, counter-clockwise from +Rx to the image direction of detector +Qx: "
             "eps_image = R eps_detector R^T",
}


def rotate_strain(strain_xx, strain_yy, shear_xy, angle_deg: float):
    """The symmetric strain tensor ``[[xx, xy], [xy, yy]]`` expressed in axes turned by ``angle_deg``.

    Args:
      strain_xx, strain_yy, shear_xy: arrays of one shape (tensor shear, dimensionless; NaN stays NaN).
      angle_deg: ``phi``, degrees counter-clockwise from the old +x axis to the direction whose components are
        ``R(phi) v`` in the new frame (see the module docstring).

    Returns:
      ``(strain_xx', strain_yy', shear_xy')`` of ``R(phi) eps R(phi)^T``, in the input's floating dtype (computed
      in float64). Trace and determinant are unchanged.
    """
    exx, eyy, exy = (np.asarray(a) for a in (strain_xx, strain_yy, shear_xy))
    dtype = np.result_type(exx, eyy, exy, np.float32)
    exx, eyy, exy = (a.astype(np.float64) for a in (exx, eyy, exy))
    phi = np.deg2rad(float(angle_deg))
    c, s = np.cos(phi), np.sin(phi)
    xx = c * c * exx - 2 * c * s * exy + s * s * eyy
    yy = s * s * exx + 2 * c * s * exy + c * c * eyy
    xy = c * s * (exx - eyy) + (c * c - s * s) * exy
    return tuple(a.astype(dtype) for a in (xx, yy, xy))


def image_frame_maps(maps: dict, scan_rotation_deg: float) -> dict[str, np.ndarray]:
    """``{"image_frame/strain_xx", ".../strain_yy", ".../shear_xy", ".../rotation"}`` from detector-frame maps."""
    xx, yy, xy = rotate_strain(maps["strain_xx"], maps["strain_yy"], maps["shear_xy"], scan_rotation_deg)
    return {"image_frame/strain_xx": xx, "image_frame/strain_yy": yy, "image_frame/shear_xy": xy,
            "image_frame/rotation": np.asarray(maps["rotation"])}


def frame_attrs(scan_rotation_deg: float | None, calibration: dict | None) -> dict:
    """Root attributes of a strain-map file: the frames, the scan rotation and the calibration.

    ``frame`` names the frame of the root maps (``"detector"``); ``frames`` (JSON) describes each frame present;
    ``scan_rotation_deg`` only with a rotation; ``q_pixel`` (1/Angstrom per pattern pixel, after binning) and
    ``scan_step`` (Angstrom) only when the input file gave them.
    """
    frames = {"detector": FRAME_DESCRIPTIONS["detector"]}
    out = {"frame": "detector"}
    if scan_rotation_deg is not None:
        frames["image"] = FRAME_DESCRIPTIONS["image"] + " (maps under /image_frame/)"
        out["scan_rotation_deg"] = float(scan_rotation_deg)
    out["frames"] = json.dumps(frames)
    for key, units in (("q_pixel", "1/Angstrom per detector pixel"), ("scan_step", "Angstrom")):
        if calibration and key in calibration:
            out[key] = float(calibration[key])
            out[f"{key}_units"] = units
    return out
