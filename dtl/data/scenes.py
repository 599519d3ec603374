"""Vectorised numpy renderer of small synthetic scenes (shapes on textured backgrounds).

One renderer serves two consumers: the pretraining source task of the embedded backbone
(``tools/pretrain_embedded.py``, which needs thousands of labelled images per second on a CPU core) and the
VTAB-like synthetic tasks (``dtl.data.synthetic``, which fix some scene factors and vary the rest). Every scene
factor can therefore be given explicitly (an array) or left to the random generator (``None``), and the renderer
returns every factor plus per-pixel label maps, so dense per-patch heads can be trained on the same images.

The work is vectorised over images: Python loops run over object slots and shape types only, never pixels.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "ring", "cross", "star", "bar", "ellipse", "hexagon", "semicircle",
)
SHAPE_IDS: dict[str, int] = {name: i for i, name in enumerate(SHAPES)}

#: Order of rotational symmetry of each shape (0 = continuous: orientation is undefined). Orientation labels
#: are only meaningful modulo ``2 pi / order``, so consumers bin the angle within that period.
SYMMETRY_ORDER: dict[str, int] = {
    "circle": 0, "square": 4, "triangle": 3, "ring": 0, "cross": 4, "star": 5, "bar": 2, "ellipse": 2,
    "hexagon": 6, "semicircle": 1,
}

#: Saturated object colours, chosen to stay distinguishable from each other and from the muted backgrounds.
PALETTE: np.ndarray = np.array([
    (230, 25, 25),     # red
    (40, 200, 40),     # green
    (30, 60, 230),     # blue
    (240, 220, 30),    # yellow
    (30, 210, 220),    # cyan
    (220, 40, 200),    # magenta
    (250, 130, 20),    # orange
    (120, 40, 180),    # purple
    (245, 245, 245),   # white
    (15, 15, 15),      # black
], dtype=np.float32)
COLOURS: tuple[str, ...] = (
    "red", "green", "blue", "yellow", "cyan", "magenta", "orange", "purple", "white", "black",
)
BACKGROUNDS: tuple[str, ...] = ("flat", "gradient", "noise", "stripes", "checker")

#: Radius range (pixels, at 32 px) of the pretraining scenes (dtl/weights/vit_micro_patch4_32.json records the run).
DEFAULT_RADIUS_RANGE: tuple[float, float] = (2.5, 9.0)

# A pixel is labelled with an object when the object covers at least this fraction of it.
_COVER_THRESHOLD = 0.5


def _inside(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of the unit-size ``shape`` in object coordinates (u, v), radius 1, angle 0.

    Every shape fits the unit disc, so ``radius`` means the same visual extent for all of them.
    """
    name = SHAPES[shape]
    if name == "circle":
        return u * u + v * v <= 1.0
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.7071
    if name == "triangle":  # equilateral, circumradius 1, inradius 0.5, apex pointing up (-v)
        return (v <= 0.5) & (0.866 * u - 0.5 * v <= 0.5) & (-0.866 * u - 0.5 * v <= 0.5)
    if name == "ring":
        rho2 = u * u + v * v
        return (rho2 <= 1.0) & (rho2 >= 0.3)
    if name == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.28) & (av <= 0.95)) | ((av <= 0.28) & (au <= 0.95))
    if name == "star":  # five points: radius oscillates between 0.42 and 1 with the polar angle
        phase = np.arctan2(v, u) * (5.0 / (2.0 * np.pi)) + 0.25
        tri = np.abs(phase - np.floor(phase) - 0.5) * 2.0
        return np.sqrt(u * u + v * v) <= 0.42 + 0.58 * tri
    if name == "bar":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.25)
    if name == "ellipse":
        return u * u + 4.0 * v * v <= 1.0
    if name == "hexagon":  # circumradius 1, apothem 0.866
        return ((np.abs(v) <= 0.866)
                & (np.abs(0.866 * u + 0.5 * v) <= 0.866)
                & (np.abs(0.866 * u - 0.5 * v) <= 0.866))
    if name == "semicircle":  # flat side down, centred on its bounding box so the disc of radius 1 holds it
        w = v - 0.5
        return (u * u + w * w <= 1.0) & (w <= 0.0) & (v >= -0.5)
    raise ValueError(f"unknown shape id {shape}")


def _per_object(value: np.ndarray | float | None, n: int, k: int, trailing: tuple[int, ...],
                sample: Callable[[tuple[int, ...]], np.ndarray], dtype: type) -> np.ndarray:
    """Normalise a per-object factor to shape (n, k, *trailing).

    Accepts ``None`` (drawn by ``sample``), a value shared by all objects (scalar or ``trailing``-shaped), one
    value per image (n, *trailing) or one per object (n, k, *trailing).
    """
    if value is None:
        return np.asarray(sample((n, k) + trailing), dtype=dtype)
    arr = np.asarray(value, dtype=dtype)
    if arr.shape == (n,) + trailing:
        arr = arr[:, None]
    return np.broadcast_to(arr, (n, k) + trailing).copy()


def sample_positions(rng: np.random.Generator, radii: np.ndarray, size: int, active: np.ndarray,
                     overlap: float = 0.8, tries: int = 20) -> np.ndarray:
    """Object centres (n, k, 2) as (x, y) pixels, kept inside the image and mostly apart.

    Centres stay ``0.6 * radius`` from the border (objects may be clipped a little, never lost). Each object is
    re-drawn up to ``tries`` times while its centre is closer than ``overlap * (r_i + r_j)`` to an earlier active
    object, which keeps counts and per-object labels honest without forbidding contact.
    """
    n, k = radii.shape
    margin = np.minimum(0.6 * radii, size / 2.0 - 0.5)
    positions = np.zeros((n, k, 2), dtype=np.float32)
    for j in range(k):
        lo, hi = margin[:, j, None], size - margin[:, j, None]
        cand = rng.uniform(0.0, 1.0, (n, 2)) * (hi - lo) + lo
        for _ in range(tries if j else 0):
            gap = np.linalg.norm(positions[:, :j] - cand[:, None], axis=-1)
            min_gap = overlap * (radii[:, :j] + radii[:, j, None])
            clash = ((gap < min_gap) & active[:, :j]).any(axis=1) & active[:, j]
            if not clash.any():
                break
            cand[clash] = rng.uniform(0.0, 1.0, (int(clash.sum()), 2)) * (hi[clash] - lo[clash]) + lo[clash]
        positions[:, j] = cand
    return positions


def _muted_colours(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random low-saturation RGB colours, so palette objects stand out from any background."""
    grey = rng.uniform(40.0, 215.0, shape + (1,))
    tint = rng.uniform(0.0, 255.0, shape + (3,))
    return (0.7 * grey + 0.3 * tint).astype(np.float32)


def render_backgrounds(rng: np.random.Generator, kinds: np.ndarray, size: int) -> np.ndarray:
    """Float32 backgrounds (n, size, size, 3) in [0, 255], one of ``BACKGROUNDS`` per image."""
    n = len(kinds)
    c0, c1 = _muted_colours(rng, (n,)), _muted_colours(rng, (n,))
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    ys, xs = np.meshgrid(coords, coords, indexing="ij")
    theta = rng.uniform(0.0, 2.0 * np.pi, (n, 1, 1)).astype(np.float32)
    along = np.cos(theta) * xs + np.sin(theta) * ys          # (n, H, W), in [-0.71, 0.71]
    across = -np.sin(theta) * xs + np.cos(theta) * ys
    freq = rng.uniform(2.0, 6.0, (n, 1, 1)).astype(np.float32)   # periods per image width
    mix = np.zeros((n, size, size), dtype=np.float32)
    name = np.asarray(BACKGROUNDS)[kinds]
    sel = name == "gradient"
    mix[sel] = (along[sel] + 0.71) / 1.42
    sel = name == "noise"
    mix[sel] = rng.uniform(0.0, 1.0, (int(sel.sum()), size, size))
    sel = name == "stripes"
    mix[sel] = (np.sin(2.0 * np.pi * freq[sel] * along[sel]) > 0).astype(np.float32)
    sel = name == "checker"
    mix[sel] = ((np.floor(freq[sel] * (along[sel] + 1.0)) + np.floor(freq[sel] * (across[sel] + 1.0))) % 2)
    mix = mix[..., None]
    return c0[:, None, None] * (1.0 - mix) + c1[:, None, None] * mix


def render_scenes(
    rng: np.random.Generator,
    n: int,
    size: int = 32,
    num_objects: np.ndarray | int | None = None,
    shapes: np.ndarray | int | None = None,
    positions: np.ndarray | None = None,
    angles: np.ndarray | float | None = None,
    radii: np.ndarray | float | None = None,
    colours: np.ndarray | int | None = None,
    backgrounds: np.ndarray | int | None = None,
    max_objects: int = 4,
    radius_range: tuple[float, float] = DEFAULT_RADIUS_RANGE,
    supersample: int = 1,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Render ``n`` scenes of 1..``max_objects`` shapes; factors left as ``None`` are drawn from ``rng``.

    One function on purpose: the factors are drawn from ``rng`` in one fixed order, and the embedded data sets'
    images (and so every figure measured on them) depend on that order.

    Args:
        rng: the only source of randomness, so a seeded generator gives identical images.
        n: number of images.
        size: image side in pixels.
        num_objects: objects per image, int or (n,); default uniform in 1..``max_objects``.
        shapes, angles (radians), radii (pixels), colours (palette ids): per object, given as a scalar,
            (n,) (same for every object of an image) or (n, k); default uniform (radii in ``radius_range``).
        positions: centres as (x, y) pixels, (n, 2) or (n, k, 2); default ``sample_positions``.
        backgrounds: background type ids (``BACKGROUNDS``), int or (n,); default uniform.
        max_objects: upper bound of the random object count (ignored when ``num_objects`` is given).
        radius_range: range of random radii.
        supersample: render at ``supersample`` x the resolution and average (anti-aliasing; costs its square).

    Returns:
        ``images`` uint8 (n, size, size, 3) and a dict of labels: ``num_objects`` (n,), ``background`` (n,),
        ``shape``, ``colour`` (n, k) int (-1 for absent slots), ``angle``, ``radius`` (n, k) float,
        ``position`` (n, k, 2) float, and per-pixel ``shape_map``, ``colour_map`` (n, size, size) int8 naming
        the top-most object covering at least half of each pixel (-1 for background). Later slots are drawn on
        top of earlier ones.
    """
    if num_objects is None:
        counts = rng.integers(1, max_objects + 1, n)
    else:
        counts = np.broadcast_to(np.asarray(num_objects, dtype=np.int64), (n,)).copy()
    k = int(counts.max()) if n else 0
    active = np.arange(k)[None, :] < counts[:, None]

    shape_ids = _per_object(shapes, n, k, (), lambda s: rng.integers(0, len(SHAPES), s), np.int64)
    colour_ids = _per_object(colours, n, k, (), lambda s: rng.integers(0, len(PALETTE), s), np.int64)
    angle = _per_object(angles, n, k, (), lambda s: rng.uniform(0.0, 2.0 * np.pi, s), np.float32)
    radius = _per_object(radii, n, k, (), lambda s: rng.uniform(*radius_range, s), np.float32)
    centre = _per_object(positions, n, k, (2,), lambda _: sample_positions(rng, radius, size, active), np.float32)
    bg = (rng.integers(0, len(BACKGROUNDS), n) if backgrounds is None
          else np.broadcast_to(np.asarray(backgrounds, dtype=np.int64), (n,)).copy())

    image = render_backgrounds(rng, bg, size)
    shape_map = np.full((n, size, size), -1, dtype=np.int8)
    colour_map = np.full((n, size, size), -1, dtype=np.int8)
    ss = supersample
    grid = (np.arange(size * ss, dtype=np.float32) + 0.5) / ss           # sample points in pixel units
    cos, sin = np.cos(angle), np.sin(angle)
    for j in range(k):
        idx = np.flatnonzero(active[:, j])
        dx = grid[None, None, :] - centre[idx, j, 0, None, None]
        dy = grid[None, :, None] - centre[idx, j, 1, None, None]
        c, s_, r = (a[idx, j, None, None] for a in (cos, sin, radius))
        u = (c * dx + s_ * dy) / r
        v = (-s_ * dx + c * dy) / r
        mask = np.zeros(u.shape, dtype=bool)
        for shape in np.unique(shape_ids[idx, j]):
            sel = shape_ids[idx, j] == shape
            mask[sel] = _inside(int(shape), u[sel], v[sel])
        cover = mask.reshape(len(idx), size, ss, size, ss).mean(axis=(2, 4), dtype=np.float32)[..., None]
        colour = PALETTE[colour_ids[idx, j]][:, None, None]
        image[idx] = image[idx] * (1.0 - cover) + colour * cover
        hit = cover[..., 0] >= _COVER_THRESHOLD
        shape_map[idx] = np.where(hit, shape_ids[idx, j, None, None], shape_map[idx])
        colour_map[idx] = np.where(hit, colour_ids[idx, j, None, None], colour_map[idx])

    labels = {
        "num_objects": counts,
        "background": bg,
        "shape": np.where(active, shape_ids, -1),
        "colour": np.where(active, colour_ids, -1),
        "angle": angle,
        "radius": radius,
        "position": centre,
        "shape_map": shape_map,
        "colour_map": colour_map,
    }
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), labels


def orientation_bins(angles: np.ndarray, shapes: np.ndarray, bins: int) -> np.ndarray:
    """Bin each angle within its shape's symmetry period; -1 where orientation is undefined (discs, rings).

    A square rotated by 90 degrees is the same image, so only the phase within ``2 pi / order`` is observable.
    """
    order = np.array([SYMMETRY_ORDER[s] for s in SHAPES])[np.clip(shapes, 0, None)]
    period = 2.0 * np.pi / np.maximum(order, 1)
    phase = np.mod(angles, period) / period
    out = np.minimum((phase * bins).astype(np.int64), bins - 1)
    return np.where((order == 0) | (shapes < 0), -1, out)

