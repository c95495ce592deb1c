"""The built-in captioned dataset: procedurally drawn scenes of 1-3 coloured shapes.

Each example is a plain background with one to three shapes (circle, square, triangle, star) in
one of eight colours and two sizes, plus a caption in simple English that describes them, e.g.

    "a large red circle above a small blue square on a grey background"

The relation word (above / below / left of / right of) is computed from the positions of the first
two shapes; a third shape is mentioned with "and". Shapes never overlap, never share the
background's colour, and the first two are placed so that the relation is unambiguous (the centres
differ clearly more along one axis than along the other).

An example is a pure function of (index, seed, size): no files, no global state, any index
(the dataset is unlimited). The random draws depend only on (seed, index), so the same scene is
drawn at every size. Shapes are drawn with PIL at `supersample` times the resolution and reduced
with a box filter, which anti-aliases the edges while the interiors keep their exact colour.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Colour vocabulary: the caption word -> the exact RGB drawn (0..255).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 30),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "orange": (245, 135, 20),
    "purple": (130, 40, 170),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "brown": (120, 80, 45),
    "pink": (250, 180, 200),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = ("small", "large")
RELATIONS = ("above", "below", "left of", "right of")
# Shape "radius" (circumradius for polygons) as a fraction of the image side.
_RADIUS = {"small": (0.08, 0.11), "large": (0.16, 0.21)}
_MAX_TRIES = 64

# Every word a caption can contain (tests and users can check captions against it).
VOCABULARY: frozenset[str] = frozenset(
    {"a", "and", "on", "background", "above", "below", "left", "right", "of"}
    | set(COLOURS) | set(BACKGROUNDS) | set(SHAPES) | set(SIZES))


@dataclass(frozen=True)
class Shape:
    kind: str          # one of SHAPES
    colour: str        # one of COLOURS
    size: str          # one of SIZES
    cx: float          # centre, as a fraction of the image side (x to the right, y down)
    cy: float
    radius: float      # as a fraction of the image side
    angle: float       # rotation in radians (polygons)

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]
    relation: str      # relation of shapes[0] to shapes[1]; "" with one shape

    @property
    def caption(self) -> str:
        s = self.shapes
        text = s[0].phrase
        if len(s) >= 2:
            text += f" {self.relation} {s[1].phrase}"
        if len(s) == 3:
            text += f" and {s[2].phrase}"
        return f"{text} on a {self.background} background"


def _relation(a: Shape, b: Shape) -> str:
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dy) >= abs(dx):
        return "above" if dy < 0 else "below"
    return "left of" if dx < 0 else "right of"


def synthetic_scene(index: int, seed: int = 0) -> Scene:
    """The scene (background, shapes, relation) of example `index`; independent of the image size."""
    index, seed = int(index), int(seed)
    if index < 0 or seed < 0:
        raise ValueError(f"synthetic example index and seed must be >= 0, got index={index}, seed={seed}")
    rng = np.random.default_rng([seed, index])
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    colours = [c for c in COLOURS if c != background]
    n = int(rng.integers(1, 4))
    shapes: list[Shape] = []
    for k in range(n):
        kind = SHAPES[rng.integers(len(SHAPES))]
        colour = colours[rng.integers(len(colours))]
        size = SIZES[rng.integers(len(SIZES))]
        radius = float(rng.uniform(*_RADIUS[size]))
        angle = float(rng.uniform(0.0, 2.0 * math.pi))
        placed = None
        for _ in range(_MAX_TRIES):
            margin = radius + 0.01
            cx, cy = (float(v) for v in rng.uniform(margin, 1.0 - margin, size=2))
            if any(math.hypot(cx - o.cx, cy - o.cy) < radius + o.radius + 0.02 for o in shapes):
                continue
            if k == 1:  # make the relation of the first two shapes unambiguous
                dx, dy = abs(cx - shapes[0].cx), abs(cy - shapes[0].cy)
                if max(dx, dy) < 1.5 * min(dx, dy):
                    continue
            placed = (cx, cy)
            break
        if placed is None:  # no room left: the scene keeps the shapes placed so far
            break
        shapes.append(Shape(kind, colour, size, placed[0], placed[1], radius, angle))
    relation = _relation(shapes[0], shapes[1]) if len(shapes) >= 2 else ""
    return Scene(background, tuple(shapes), relation)


def _polygon(shape: Shape, scale: float) -> list[tuple[float, float]]:
    cx, cy, r = shape.cx * scale, shape.cy * scale, shape.radius * scale
    if shape.kind == "square":
        radii, n = [r], 4
    elif shape.kind == "triangle":
        radii, n = [r], 3
    else:  # star: 5 points, alternating outer and inner radius
        radii, n = [r, 0.45 * r], 10
    return [(cx + radii[i % len(radii)] * math.cos(shape.angle + 2 * math.pi * i / n),
             cy + radii[i % len(radii)] * math.sin(shape.angle + 2 * math.pi * i / n)) for i in range(n)]


def render_scene(scene: Scene, size: int, supersample: int | None = None) -> np.ndarray:
    """Draw a scene as float32 [size, size, 3] in [0, 1]."""
    from PIL import Image, ImageDraw

    if size < 8:
        raise ValueError(f"synthetic images need size >= 8, got {size}")
    if supersample is None:  # anti-aliasing; the drawing canvas stays <= 1024 pixels a side
        supersample = max(1, min(4, 1024 // size))
    big = size * supersample
    im = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(im)
    for s in scene.shapes:
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            cx, cy, r = s.cx * big, s.cy * big, s.radius * big
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_polygon(s, big), fill=fill)
    if supersample > 1:
        im = im.reduce(supersample)
    return np.asarray(im, np.float32) / 255.0


def synthetic_example(index: int, seed: int = 0, size: int = 64) -> tuple[np.ndarray, str]:
    """Example `index` of the synthetic dataset: (image float32 [size, size, 3] in [0, 1], caption)."""
    scene = synthetic_scene(index, seed)
    return render_scene(scene, size), scene.caption
