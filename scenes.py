"""
Procedural RGB-D scenes: a textured ground plane, a sky gradient and 1-4 primitives (spheres, boxes,
cylinders, cones) lit by a sun, with exact z-depth and a caption naming every object.

Scene i is a pure function of i: its parameters come from a PCG64 stream seeded with i and the
renderer uses only correctly rounded float64 arithmetic (+ - * / sqrt floor) per pixel, so the
same (i, res) gives the same arrays in any process and with any thread count. Scenes 0, 1, ...
are the training split; TEST_OFFSET + i are the held-out ("test") scenes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

TEST_OFFSET = 1_000_000_000  # scene index of the first held-out ("test") scene


# -----------------------------------------------------------------------------
# What can be in a scene
# World frame: x right, y up, z forward; the camera sits at (0, height, 0) looking along +z,
# pitched down.

# Object colours (sRGB, 0..1). Names are what the captions say, so each must read as that colour.
COLOURS = {
    "red": (0.82, 0.10, 0.08), "orange": (0.96, 0.48, 0.06), "yellow": (0.96, 0.84, 0.12),
    "green": (0.14, 0.64, 0.18), "blue": (0.10, 0.28, 0.88), "purple": (0.48, 0.18, 0.70),
    "pink": (0.96, 0.52, 0.72), "white": (0.93, 0.93, 0.91), "black": (0.07, 0.07, 0.08),
    "cyan": (0.08, 0.76, 0.82), "brown": (0.46, 0.27, 0.11), "gray": (0.50, 0.50, 0.52),
}
SHAPES = ("sphere", "box", "cylinder", "cone")
SIZES = {"small": (0.35, 0.55), "medium": (0.6, 0.9), "large": (1.0, 1.5)}  # overall size, metres
FLOORS = {  # texture -> how the caption says it
    "checkered": "on a checkered floor", "striped": "on a striped floor", "tiled": "on a tiled floor",
    "wooden": "on a wooden floor", "grassy": "on grass", "sandy": "on sand",
}
# Two colours per floor: (base, pattern). For tiles the second is the grout.
FLOOR_PALETTES = {
    "checkered": [((0.90, 0.90, 0.88), (0.10, 0.10, 0.10)), ((0.86, 0.86, 0.86), (0.45, 0.45, 0.48)),
                  ((0.86, 0.76, 0.60), (0.44, 0.30, 0.18)), ((0.90, 0.90, 0.86), (0.66, 0.16, 0.12)),
                  ((0.80, 0.85, 0.90), (0.20, 0.30, 0.50))],
    "striped": [((0.92, 0.90, 0.85), (0.25, 0.45, 0.70)), ((0.95, 0.85, 0.30), (0.20, 0.20, 0.20)),
                ((0.90, 0.90, 0.90), (0.70, 0.25, 0.25)), ((0.60, 0.80, 0.60), (0.30, 0.50, 0.30))],
    "tiled": [((0.90, 0.90, 0.86), (0.35, 0.35, 0.35)), ((0.74, 0.42, 0.30), (0.82, 0.80, 0.74)),
              ((0.60, 0.74, 0.86), (0.95, 0.95, 0.95)), ((0.55, 0.55, 0.55), (0.20, 0.20, 0.20))],
    "wooden": [((0.70, 0.50, 0.30), (0.45, 0.28, 0.15)), ((0.86, 0.70, 0.50), (0.60, 0.45, 0.30)),
               ((0.45, 0.30, 0.20), (0.25, 0.15, 0.08))],
    "grassy": [((0.36, 0.60, 0.20), (0.17, 0.38, 0.10)), ((0.50, 0.66, 0.25), (0.30, 0.45, 0.15))],
    "sandy": [((0.92, 0.82, 0.62), (0.74, 0.62, 0.42)), ((0.86, 0.76, 0.60), (0.70, 0.60, 0.46))],
}
FLOOR_SCALES = {"checkered": (0.5, 1.5), "striped": (0.3, 1.0), "tiled": (0.4, 1.0),
                "wooden": (0.15, 0.3), "grassy": (0.3, 0.8), "sandy": (0.6, 1.5)}  # metres
# Skies: (horizon, zenith, sun colour * intensity), sRGB-ish.
SKIES = [
    ((0.78, 0.86, 0.95), (0.22, 0.45, 0.85), (1.00, 0.96, 0.88)),   # clear
    ((0.86, 0.88, 0.89), (0.50, 0.62, 0.80), (0.95, 0.92, 0.85)),   # hazy
    ((0.98, 0.74, 0.52), (0.30, 0.35, 0.65), (1.00, 0.84, 0.66)),   # sunset
    ((0.78, 0.79, 0.80), (0.58, 0.60, 0.64), (0.60, 0.60, 0.62)),   # overcast
]


@dataclass
class Primitive:
    """One object standing on the ground. dims: sphere (r, r, r); box half extents (ex, ey, ez);
    cylinder / cone (radius, height, radius). (x, z) is the centre of its footprint."""
    shape: str
    colour: str
    size: str
    x: float
    z: float
    dims: tuple[float, float, float]
    yaw: float = 0.0  # radians, boxes only

    @property
    def radius(self) -> float:
        """Radius of the footprint's bounding circle on the ground (metres)."""
        return math.hypot(self.dims[0], self.dims[2]) if self.shape == "box" else self.dims[0]

    @property
    def height(self) -> float:
        return {"sphere": 2 * self.dims[0], "box": 2 * self.dims[1]}.get(self.shape, self.dims[1])

    def phrase(self, article: str = "a") -> str:
        """'a large red box'; with article 'the' the size is dropped (colours are unique)."""
        size = "" if self.size == "medium" or article == "the" else self.size + " "
        words = f"{size}{self.colour} {self.shape}"
        if article == "a" and words[0] in "aeiou":
            article = "an"
        return f"{article} {words}"


@dataclass
class Scene:
    """All parameters of procedural scene `index` (no pixels): enough to render at any resolution."""
    index: int
    fov_deg: float
    cam_height: float
    pitch: float                                  # radians, camera looks down by this much
    sun: tuple[float, float, float]               # unit vector towards the sun
    sky: tuple                                    # (horizon, zenith, sun colour)
    floor: str
    floor_colours: tuple
    floor_scale: float
    floor_angle: float                            # pattern rotation (radians)
    floor_offset: tuple[float, float]
    ground_radius: float                          # the ground ends here; beyond is sky
    objects: list[Primitive] = field(default_factory=list)
    caption: str = ""


# -----------------------------------------------------------------------------
# Sampling parameters and captions


def _jitter(rng: np.random.Generator, rgb, amount: float = 0.04) -> tuple[float, float, float]:
    """A slightly different shade of a palette colour, so colours don't come from a tiny set."""
    return tuple(float(min(1.0, max(0.0, c + rng.uniform(-amount, amount)))) for c in rgb)


def _camera_basis(pitch: float) -> tuple[tuple, tuple, tuple]:
    """(right, up, forward) unit vectors of a camera pitched down by `pitch` radians."""
    c, s = math.cos(pitch), math.sin(pitch)
    return (1.0, 0.0, 0.0), (0.0, c, s), (0.0, -s, c)


def _make_primitive(rng: np.random.Generator, colour: str) -> Primitive:
    shape = SHAPES[rng.integers(len(SHAPES))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    s = float(rng.uniform(*SIZES[size]))
    if shape == "sphere":
        dims = (s / 2, s / 2, s / 2)
    elif shape == "box":
        dims = (s / 2 * rng.uniform(0.7, 1.3), s / 2 * rng.uniform(0.7, 1.3), s / 2 * rng.uniform(0.7, 1.3))
    elif shape == "cylinder":
        r, height = s * rng.uniform(0.3, 0.45), s * rng.uniform(0.8, 1.5)
        dims = (r, height, r)
    else:  # cone: a bit taller than wide so it reads as a cone from a low camera
        r, height = s * rng.uniform(0.35, 0.5), s * rng.uniform(1.0, 1.5)
        dims = (r, height, r)
    yaw = float(rng.uniform(0, math.pi / 2)) if shape == "box" else 0.0
    return Primitive(shape, colour, size, 0.0, 0.0, tuple(float(v) for v in dims), yaw)


def _view_coords(obj: Primitive, scene: Scene) -> tuple[float, float]:
    """(depth along the optical axis, height in the camera frame) of obj's centre, metres."""
    _, up, fwd = _camera_basis(scene.pitch)
    rel = (obj.x, obj.height / 2 - scene.cam_height, obj.z)
    return sum(r * f for r, f in zip(rel, fwd)), sum(r * u for r, u in zip(rel, up))


def _fits(obj: Primitive, placed: list[Primitive], scene: Scene) -> bool:
    """Is obj (already positioned) inside the view, in front of the camera, clear of the others and
    not hidden behind them? Keeps every object the caption mentions visible in the picture."""
    a = math.tan(math.radians(scene.fov_deg) / 2)
    zc, yc = _view_coords(obj, scene)
    if zc < obj.radius + 1.0 or abs(obj.x) + 0.5 * obj.radius > 0.9 * a * zc or abs(yc) > 0.8 * a * zc:
        return False
    if obj.radius / zc < 0.08 * a:  # narrower than 8% of the picture: a speck at 32 x 32
        return False
    lo, hi = (obj.x - obj.radius) / zc, (obj.x + obj.radius) / zc   # horizontal extent in the image
    for q in placed:
        if math.hypot(obj.x - q.x, obj.z - q.z) < obj.radius + q.radius + 0.25:
            return False
        qz = _view_coords(q, scene)[0]
        qlo, qhi = (q.x - q.radius) / qz, (q.x + q.radius) / qz
        if min(hi, qhi) - max(lo, qlo) > 0.5 * min(hi - lo, qhi - qlo):
            return False
    return True


def _relation(a: Primitive, b: Primitive) -> str:
    """Where a is relative to b, as seen from the camera (lateral offsets look bigger than depth
    offsets in a perspective picture, hence the 0.6)."""
    dx, dz = a.x - b.x, a.z - b.z
    if abs(dx) >= 0.6 * abs(dz):
        return "left of" if dx < 0 else "right of"
    return "in front of" if dz < 0 else "behind"


def _caption(objects: list[Primitive], floor: str) -> str:
    """e.g. 'a red sphere left of a large blue box, and a cone behind the blue box on grass'.
    Each object after the second is related to the one before it; colours are unique per scene,
    so 'the <colour> <shape>' is unambiguous."""
    first = objects[0].phrase()
    if len(objects) == 1:
        return f"{first} {FLOORS[floor]}"
    parts = [f"{first} {_relation(objects[0], objects[1])} {objects[1].phrase()}"]
    for prev, obj in zip(objects[1:], objects[2:]):
        link = "and " if obj is objects[-1] else ""
        parts.append(f"{link}{obj.phrase()} {_relation(obj, prev)} {prev.phrase('the')}")
    return ", ".join(parts) + " " + FLOORS[floor]


def _place(obj: Primitive, scene: Scene, rng: np.random.Generator, tries: int = 60) -> None:
    """Rejection-sample a position for obj and add it to the scene; leave it out if none fits."""
    a = math.tan(math.radians(scene.fov_deg) / 2)
    for _ in range(tries):
        obj.z = float(rng.uniform(2.0, 11.0))
        obj.x = float(rng.uniform(-0.85, 0.85) * a * obj.z)
        if _fits(obj, scene.objects, scene):
            scene.objects.append(obj)
            return


def sample_scene(index: int) -> Scene:
    """The parameters of scene `index` (deterministic: a PCG64 stream seeded with the index)."""
    rng = np.random.Generator(np.random.PCG64(index))
    floor = list(FLOORS)[rng.integers(len(FLOORS))]
    palette = FLOOR_PALETTES[floor]
    c0, c1 = palette[rng.integers(len(palette))]
    sky = SKIES[rng.integers(len(SKIES))]
    elev, azim = math.radians(rng.uniform(25, 65)), rng.uniform(-math.pi, math.pi)
    scene = Scene(
        index=index,
        fov_deg=float(rng.uniform(45, 75)),
        cam_height=float(rng.uniform(0.8, 2.2)),
        pitch=math.radians(rng.uniform(4, 22)),
        sun=(math.cos(elev) * math.sin(azim), math.sin(elev), math.cos(elev) * math.cos(azim)),
        sky=(_jitter(rng, sky[0]), _jitter(rng, sky[1]), sky[2]),
        floor=floor,
        floor_colours=(_jitter(rng, c0), _jitter(rng, c1)),
        floor_scale=float(rng.uniform(*FLOOR_SCALES[floor])),
        floor_angle=float(rng.uniform(0, math.pi)),
        floor_offset=(float(rng.uniform(0, 10)), float(rng.uniform(0, 10))),
        ground_radius=float(rng.uniform(30, 60)),
    )
    n_objects = int(rng.integers(1, 5))
    colours = [list(COLOURS)[k] for k in rng.permutation(len(COLOURS))[:n_objects]]
    for colour in colours:
        _place(_make_primitive(rng, colour), scene, rng)
    while not scene.objects:  # rare (0.2%): nothing fitted, e.g. a small object under a high camera
        _place(_make_primitive(rng, colours[0]), scene, rng)
    scene.caption = _caption(scene.objects, floor)
    return scene


def scene_captions(n: int) -> list[str]:
    """Captions of training scenes 0..n-1 (from parameters only; no rendering)."""
    return [sample_scene(i).caption for i in range(n)]


# -----------------------------------------------------------------------------
# Ray casting
# Rays are (3, P) arrays of directions whose component along the camera's optical axis is 1, so
# the ray parameter t of a hit *is* its z-depth. Dot products are written out component-wise (no
# BLAS) to keep results bit-identical across machines and thread counts.

_EPS = 1e-6


def _dot(a, b):
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _box_local(obj: Primitive, v, is_point: bool):
    """World vector/point -> the box's frame (centre at origin, axes along its edges)."""
    c, s = math.cos(obj.yaw), math.sin(obj.yaw)
    x, y, z = (v[0] - obj.x, v[1] - obj.dims[1], v[2] - obj.z) if is_point else (v[0], v[1], v[2])
    return c * x - s * z, y, s * x + c * z


def _hit(obj: Primitive, o, d) -> np.ndarray:
    """Nearest hit distance t > 0 of rays o + t d with obj -> (P,) float64, inf for a miss.

    o, d: (3, P) or (3, 1) arrays. Objects cover a small part of the picture, so a cheap test
    against the object's bounding sphere picks the rays that get the exact (costlier) test."""
    t = np.full(max(o.shape[1], d.shape[1]), np.inf)
    ox, oy, oz = o[0] - obj.x, o[1] - obj.height / 2, o[2] - obj.z
    b = d[0] * ox + d[1] * oy + d[2] * oz
    c = ox * ox + oy * oy + oz * oz - (obj.radius ** 2 + obj.height ** 2 / 4)
    a = _dot(d, d)
    disc = b * b - a * c
    # the sphere is hit ahead of the origin iff disc >= 0 and the far root -b + sqrt(disc) > 0
    near = np.flatnonzero((disc >= 0) & ((b < 0) | (c < 0)))
    if near.size:
        o_near = o if o.shape[1] == 1 else o[:, near]
        t[near] = _hit_exact(obj, o_near, d if d.shape[1] == 1 else d[:, near])
    return t


def _hit_exact(obj: Primitive, o, d) -> np.ndarray:
    """_hit without the bounding-sphere shortcut. Every ray origin is outside every object (the
    camera is, and shadow rays start just off a surface), so only entry points matter."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if obj.shape == "sphere":
            r = obj.dims[0]
            ox, oy, oz = o[0] - obj.x, o[1] - r, o[2] - obj.z
            b = d[0] * ox + d[1] * oy + d[2] * oz
            c = ox * ox + oy * oy + oz * oz - r * r
            a = _dot(d, d)
            disc = b * b - a * c
            t = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
            return np.where((disc >= 0) & (t > _EPS), t, np.inf)
        if obj.shape == "box":  # slab test in the box's frame
            lo, ld = _box_local(obj, o, True), _box_local(obj, d, False)
            t_near, t_far = -np.inf, np.inf
            for k in range(3):
                inv = 1.0 / ld[k]
                t1, t2 = (-obj.dims[k] - lo[k]) * inv, (obj.dims[k] - lo[k]) * inv
                t_near, t_far = np.fmax(t_near, np.fmin(t1, t2)), np.fmin(t_far, np.fmax(t1, t2))
            return np.where((t_near <= t_far) & (t_near > _EPS), t_near, np.inf)
        # Cylinder and cone are both surfaces of revolution about a vertical axis with radius
        # r(y) = r - k y (k = 0 for a cylinder, r / height for a cone): x'^2 + z'^2 = r(y)^2.
        r, height = obj.dims[0], obj.dims[1]
        k = r / height if obj.shape == "cone" else 0.0
        ox, oz, q = o[0] - obj.x, o[2] - obj.z, r - k * o[1]
        a = d[0] * d[0] + d[2] * d[2] - k * k * d[1] * d[1]
        half_b = ox * d[0] + oz * d[2] + k * q * d[1]
        c = ox * ox + oz * oz - q * q
        disc = half_b * half_b - a * c
        root = np.sqrt(np.maximum(disc, 0.0))
        best = np.full(np.broadcast(a, c).shape, np.inf)
        for t in ((-half_b - root) / a, (-half_b + root) / a):
            y = o[1] + t * d[1]
            best = np.where((disc >= 0) & (t > _EPS) & (y >= 0) & (y <= height), np.fmin(best, t), best)
        if obj.shape == "cylinder":  # flat top cap (the bottom one rests on the ground)
            t = (height - o[1]) / d[1]
            x, z = ox + t * d[0], oz + t * d[2]
            best = np.where((t > _EPS) & (x * x + z * z <= r * r), np.fmin(best, t), best)
        return best


def _normal(obj: Primitive, p) -> np.ndarray:
    """Unit outward normals (3, P) of obj at surface points p (3, P)."""
    if obj.shape == "sphere":
        r = obj.dims[0]
        return np.stack([(p[0] - obj.x) / r, (p[1] - r) / r, (p[2] - obj.z) / r])
    if obj.shape == "box":  # the face is the axis where the point is furthest out, relative to size
        q = _box_local(obj, p, True)
        fx, fy, fz = (np.abs(q[k]) / obj.dims[k] for k in range(3))
        on_x = (fx >= fy) & (fx >= fz)
        on_y = ~on_x & (fy >= fz)
        on_z = ~on_x & ~on_y
        nx, ny, nz = np.sign(q[0]) * on_x, np.sign(q[1]) * on_y, np.sign(q[2]) * on_z
        c, s = math.cos(obj.yaw), math.sin(obj.yaw)
        return np.stack([c * nx + s * nz, ny, -s * nx + c * nz])
    r, height = obj.dims[0], obj.dims[1]
    k = r / height if obj.shape == "cone" else 0.0
    x, z = p[0] - obj.x, p[2] - obj.z
    n = np.stack([x, k * (r - k * p[1]), z])  # gradient of x'^2 + z'^2 - r(y)^2
    if obj.shape == "cylinder":
        cap = p[1] >= height - 1e-6
        n = np.where(cap, np.array([[0.0], [1.0], [0.0]]), n)
    return n / np.sqrt(_dot(n, n))


def _hash01(ix: np.ndarray, iz: np.ndarray, salt: int) -> np.ndarray:
    """A uniform [0, 1) value per integer lattice point (an integer hash, so exact everywhere)."""
    with np.errstate(over="ignore"):
        h = ix.astype(np.int64).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        h ^= iz.astype(np.int64).astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F) + np.uint64(salt)
        h ^= h >> np.uint64(31)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(29)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / 2.0 ** 53)


def _value_noise(u: np.ndarray, v: np.ndarray, salt: int) -> np.ndarray:
    """Smooth noise in [0, 1): lattice values blended with a smoothstep."""
    iu, iv = np.floor(u), np.floor(v)
    fu, fv = u - iu, v - iv
    su, sv = fu * fu * (3 - 2 * fu), fv * fv * (3 - 2 * fv)
    n00, n10 = _hash01(iu, iv, salt), _hash01(iu + 1, iv, salt)
    n01, n11 = _hash01(iu, iv + 1, salt), _hash01(iu + 1, iv + 1, salt)
    near, far = n00 + (n10 - n00) * su, n01 + (n11 - n01) * su
    return near + (far - near) * sv


def _fade(footprint: np.ndarray, feature: float) -> np.ndarray:
    """How much of a pattern with features of this size survives in a pixel of this footprint:
    1 when features are much bigger than a pixel, 0 when many fall into one. Replacing detail by
    its average this way (a poor man's mip-map) keeps far floors from aliasing into moire."""
    return np.clip(1.5 - footprint / feature, 0.0, 1.0)


def _floor_mix(scene: Scene, gx: np.ndarray, gz: np.ndarray, footprint: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Floor pattern at ground points: (weight of the second colour in [0, 1], brightness factor)."""
    s = scene.floor_scale
    c, sn = math.cos(scene.floor_angle), math.sin(scene.floor_angle)
    u = (c * gx + sn * gz) / s + scene.floor_offset[0]   # pattern coordinates, in units of s
    v = (-sn * gx + c * gz) / s + scene.floor_offset[1]
    salt = scene.index & 0xFFFFFFFF
    shade = np.ones_like(u)
    if scene.floor == "checkered":
        w = 0.5 + ((np.floor(u) + np.floor(v)) % 2 - 0.5) * _fade(footprint, s)
    elif scene.floor == "striped":
        w = 0.5 + (np.floor(u) % 2 - 0.5) * _fade(footprint, s)
    elif scene.floor == "tiled":  # grout lines of 6% width around tiles whose shade varies a bit
        grout = 1.0 - 0.94 ** 2
        line = ((u - np.floor(u)) < 0.06) | ((v - np.floor(v)) < 0.06)
        w = grout + (line - grout) * _fade(footprint, 0.15 * s)
        shade = 1.0 + (_hash01(np.floor(u), np.floor(v), salt) - 0.5) * 0.2 * _fade(footprint, s)
    elif scene.floor == "wooden":  # planks along v with their own shade, grain, dark seams
        grain = _value_noise(u * 6.0, v * 0.25, salt)
        seam = (u - np.floor(u)) < 0.05
        w = 0.5 + (0.7 * grain + 0.3 * seam - 0.5) * _fade(footprint, 0.2 * s)
        shade = 1.0 + (_hash01(np.floor(u), np.zeros_like(u), salt) - 0.5) * 0.3 * _fade(footprint, s)
    else:  # grassy / sandy: two octaves of noise, the fine one fading out first
        fine = 0.2 if scene.floor == "grassy" else 0.08
        coarse = _value_noise(u, v, salt) - 0.5
        detail = _value_noise(u / fine, v / fine, salt + 1) - 0.5
        w = 0.5 + 0.6 * coarse * _fade(footprint, s) + 0.6 * detail * _fade(footprint, fine * s)
    return w, shade


def _trace(scene: Scene, d: np.ndarray, pixel_angle: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shade rays d (3, P) from the camera -> (linear RGB (3, P), z-depth (P,), valid (P,))."""
    h = scene.cam_height
    o = np.array([[0.0], [h], [0.0]])
    with np.errstate(divide="ignore", invalid="ignore"):   # inf * 0 for rays that miss the ground
        t_ground = np.where(d[1] < 0, -h / d[1], np.inf)
        gx, gz = t_ground * d[0], t_ground * d[2]
        t_ground = np.where(gx * gx + gz * gz <= scene.ground_radius ** 2, t_ground, np.inf)
    ts = np.stack([t_ground] + [_hit(obj, o, d) for obj in scene.objects])   # (1 + n_obj, P)
    which = np.argmin(ts, axis=0)        # 0 = ground, k = object k - 1
    t = np.min(ts, axis=0)
    valid = np.isfinite(t)
    horizon, zenith, sun_rgb = (np.array(c, dtype=np.float64)[:, None] ** 2 for c in scene.sky)
    sun = np.array(scene.sun)[:, None]
    rgb = np.empty(d.shape)

    # Sky: gradient by elevation, plus a sun disc with a soft rim.
    sky = np.flatnonzero(~valid)
    if sky.size:
        view = d[:, sky] / np.sqrt(_dot(d[:, sky], d[:, sky]))
        glow = np.clip((_dot(view, sun) - 0.9985) / 0.001, 0.0, 1.0)
        rgb[:, sky] = horizon + (zenith - horizon) * np.sqrt(np.clip(view[1], 0.0, 1.0)) + sun_rgb * glow

    idx = np.flatnonzero(valid)
    if idx.size:
        th, dh, wh = t[idx], d[:, idx], which[idx]
        p = o + th * dh
        ray_len = np.sqrt(_dot(dh, dh))
        view = dh / ray_len
        normal = np.zeros_like(p)
        normal[1] = 1.0
        albedo = np.empty_like(p)
        spec = np.zeros_like(th)
        g = np.flatnonzero(wh == 0)
        if g.size:  # footprint of a pixel on the floor grows with distance and obliquity
            cos_in = np.maximum(-view[1, g], 0.02)
            footprint = th[g] * ray_len[g] * pixel_angle / cos_in
            w, shade = _floor_mix(scene, p[0, g], p[2, g], footprint)
            c0, c1 = (np.array(c)[:, None] for c in scene.floor_colours)
            albedo[:, g] = ((c0 + (c1 - c0) * w) * shade) ** 2
        for k, obj in enumerate(scene.objects, start=1):
            m = np.flatnonzero(wh == k)
            if m.size:
                normal[:, m] = _normal(obj, p[:, m])
                albedo[:, m] = (np.array(COLOURS[obj.colour])[:, None]) ** 2
                half = sun - view[:, m]       # Blinn-Phong highlight, exponent 32 = 5 squarings
                cos_h = np.maximum(_dot(normal[:, m], half) / np.sqrt(_dot(half, half)), 0.0)
                for _ in range(5):
                    cos_h = cos_h * cos_h
                spec[m] = 0.4 * cos_h
        # Direct sun only where the surface faces it and no object blocks the way (shadow rays).
        lambert = np.maximum(_dot(normal, sun), 0.0)
        lit = lambert > 0
        facing = np.flatnonzero(lit)
        if facing.size:
            origin = p[:, facing] + 1e-4 * normal[:, facing]
            blocked = np.zeros(facing.size, dtype=bool)
            for obj in scene.objects:
                blocked |= np.isfinite(_hit(obj, origin, sun))
            lit[facing] = ~blocked
        ambient = 0.5 * (horizon + zenith) * 0.55
        colour = albedo * (ambient + sun_rgb * (lambert * lit)) + sun_rgb * (spec * lit)
        # Aerial perspective: far surfaces fade into the horizon colour, hiding the ground's edge.
        fog = np.clip((th * ray_len - 0.3 * scene.ground_radius) / (0.7 * scene.ground_radius), 0.0, 1.0) ** 2
        rgb[:, idx] = colour + (horizon - colour) * fog
    return rgb, np.where(valid, t, 0.0), valid


def render(scene: Scene, res: int) -> dict:
    """Render scene parameters at res x res; see render_scene for the returned dict."""
    # Rays per pixel side. Odd, so each pixel has a centre ray: depth comes from it (a depth averaged
    # across an edge would be a point floating in mid-air), colour from the average.
    ss = 3 if res <= 64 else 1
    n = res * ss
    a = math.tan(math.radians(scene.fov_deg) / 2)
    coords = ((np.arange(n) + 0.5) * (2.0 / n) - 1.0) * a        # image plane at unit depth
    xn, yn = np.tile(coords, n), np.repeat(-coords, n)           # row 0 is the top of the image
    right, up, fwd = _camera_basis(scene.pitch)
    d = np.stack([xn * r + yn * u + f for r, u, f in zip(right, up, fwd)])
    rgb, depth, valid = _trace(scene, d, pixel_angle=2 * a / n)
    rgb = rgb.reshape(3, res, ss, res, ss)
    acc = np.zeros((3, res, res))
    for i in range(ss):          # fixed summation order: deterministic, unlike a reduction
        for j in range(ss):
            acc += rgb[:, :, i, :, j]
    srgb = np.sqrt(np.clip(acc / (ss * ss), 0.0, 1.0))            # gamma 2: linear colour = sRGB^2
    centre = ss // 2
    return {"rgb": np.floor(srgb * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0).copy(),
            "depth": depth.reshape(res, ss, res, ss)[:, centre, :, centre].astype(np.float32),
            "valid": valid.reshape(res, ss, res, ss)[:, centre, :, centre].copy(),
            "caption": scene.caption, "fov_deg": scene.fov_deg}


def render_scene(index: int, res: int) -> dict:
    """Procedural scene `index` at res x res. Returns {"rgb": uint8 (res, res, 3), "depth": float32
    (res, res) z-depth in metres (0 on sky), "valid": bool (res, res) (False on sky), "caption": str,
    "fov_deg": float (horizontal = vertical field of view)}. Same geometry at every res."""
    return render(sample_scene(index), res)
