"""Head pose (yaw, pitch, roll in degrees) from the five facial keypoints every face detector here gives.

A generic 3D five-point face (eyes, nose tip, mouth corners; millimetres, x right, y down, z away from the
camera) is fitted to the keypoints with ``cv2.solvePnP`` under a pinhole camera whose focal length is the
image width. Conventions, in the image as seen: yaw > 0 when the face turns towards the image's right,
pitch > 0 when it looks down, roll > 0 when it tilts clockwise. Yaw and roll change sign under a horizontal
flip, pitch does not (``mirror: true`` in the attribute schema).
"""

from __future__ import annotations

import math

import numpy as np

from camouflage_train.utils.optional import optional_import

# Left eye, right eye (as seen in the image), nose tip, left and right mouth corner.
FACE_MODEL_MM = np.array(
    [[-32.0, -35.0, 30.0], [32.0, -35.0, 30.0], [0.0, 0.0, 0.0], [-26.0, 32.0, 28.0], [26.0, 32.0, 28.0]],
    dtype=np.float64,
)


def camera_matrix(width: int, height: int) -> np.ndarray:
    """A pinhole camera for an image of this size: focal length the image width, centre the image centre.

    Args:
        width: the image width in pixels.
        height: the image height in pixels.
    """
    return np.array([[width, 0, width / 2], [0, width, height / 2], [0, 0, 1]], dtype=np.float64)


def rotation_from_angles(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """The model-to-camera rotation for angles in this module's conventions (the inverse of :func:`angles`).

    Args:
        yaw: degrees (the module's conventions: > 0 turned towards the image's right).
        pitch: degrees (> 0 looking down).
        roll: degrees (> 0 tilted clockwise).
    """
    y, p, r = (math.radians(v) for v in (yaw, pitch, roll))
    ry = np.array([[math.cos(y), 0, -math.sin(y)], [0, 1, 0], [math.sin(y), 0, math.cos(y)]])
    rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    rz = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    return rz @ ry @ rx


def angles(rotation: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees of ``rotation = Rz(roll) @ Ry(yaw) @ Rx(pitch)``.

    Args:
        rotation: a 3x3 rotation matrix.
    """
    yaw = math.degrees(math.asin(float(np.clip(rotation[2, 0], -1.0, 1.0))))
    pitch = math.degrees(math.atan2(rotation[2, 1], rotation[2, 2]))
    roll = math.degrees(math.atan2(rotation[1, 0], rotation[0, 0]))
    return yaw, pitch, roll


def head_pose(keypoints: np.ndarray, width: int, height: int) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees, each clipped to [-90, 90], from ``keypoints`` of shape [5, 2] in pixels.

    Args:
        keypoints: insightface's five keypoints (eyes, nose tip, mouth corners), ``[5, 2]`` pixels.
        width: the image width in pixels.
        height: the image height in pixels.
    """
    points = np.asarray(keypoints, dtype=np.float64).reshape(5, 2)
    cv2 = optional_import("cv2", "faces", "head pose from keypoints")
    ok, rvec, _ = cv2.solvePnP(FACE_MODEL_MM, points, camera_matrix(width, height), None, flags=cv2.SOLVEPNP_EPNP)
    if not ok:
        return 0.0, 0.0, 0.0
    rotation, _ = cv2.Rodrigues(rvec)
    return tuple(float(np.clip(a, -90.0, 90.0)) for a in angles(rotation))  # type: ignore[return-value]


def project(
    yaw: float, pitch: float, roll: float, center: tuple[float, float], distance_mm: float, width: int, height: int
) -> np.ndarray:
    """Pixel keypoints of the model face at a pose; used to test :func:`head_pose`.

    Args:
        yaw: degrees.
        pitch: degrees.
        roll: degrees.
        center: the face's centre in pixels ``(x, y)``.
        distance_mm: the face's distance from the camera.
        width: the image width in pixels.
        height: the image height in pixels.
    """
    cv2 = optional_import("cv2", "faces", "head pose from keypoints")
    rvec, _ = cv2.Rodrigues(rotation_from_angles(yaw, pitch, roll))
    k = camera_matrix(width, height)
    tvec = np.array(
        [(center[0] - k[0, 2]) * distance_mm / k[0, 0], (center[1] - k[1, 2]) * distance_mm / k[1, 1], distance_mm]
    )
    points, _ = cv2.projectPoints(FACE_MODEL_MM, rvec, tvec, k, None)
    return points.reshape(5, 2)
