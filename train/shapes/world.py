"""A procedural shapes world: scenes, renders, texts and task records, all deterministic from a seed.

Vocabulary (kept small and unambiguous so a tiny model can learn it on CPU):

- shape colours: red, green, blue, yellow, white, magenta, cyan (far apart in RGB, never a background colour)
- backgrounds: black, gray
- kinds: circle, square, triangle, cross, ring
- held out of the demo base's training data on purpose (``NEW_COLOUR`` cyan and ``NEW_KIND`` ring): the frozen
  parts (VAE, T5, teacher) are pretrained on the whole world (``FULL``), as T5-XXL knows words that a DiT was never
  shown; the base transformer sees only ``BASE``, and README command 1 fine-tunes it on one of them
- positions: left, center, right (three columns; every shape is vertically centred)
- sizes: large (default) and small (only sampled when asked for; captions then say "small")
- one or two shapes per scene; two shapes never share a position, a colour or a kind, so every
  question and instruction about "the red circle" or "the square" names exactly one shape.

Rendering is hard-edged (no anti-aliasing): a label map is computed from pixel centres and coloured
from the palette, so the edge and depth maps derived from the same label map are exact.

Held-out splits: a scene belongs to the test split when ``crc32(scene.key()) % 10 < 2`` (about 20 %
of all scenes), to the validation split when it is 2 (about 10 %: the scenes that sampler settings and the
recipe are chosen on, never the test scenes the report scores), otherwise to train. ``make_dataset(split=...)`` only keeps records whose scene (``meta.scene``:
the scene of the target image, or of the source for caption, vqa and perception) is in the requested split,
so train and test never share a scene (an edit's source scene may come from either part). Random streams are also disjoint: record ``i`` of a split uses
``numpy.random.SeedSequence([seed, SPLIT_IDS[split], i])``.
"""

from __future__ import annotations

import itertools
import json
import os
import zlib
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np
from PIL import Image

from unialign_core.modes import PERCEPTION_PRESETS

COLOURS = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 80, 240),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "magenta": (220, 40, 220),
    "cyan": (30, 210, 220),
}
BACKGROUNDS = {"black": (0, 0, 0), "gray": (128, 128, 128)}
REFERENCE_BACKGROUND = (64, 64, 64)  # neutral backdrop of compose reference images (not a scene background)
KINDS = ("circle", "square", "triangle", "cross", "ring")
POSITIONS = ("left", "center", "right")
SIZES = ("large", "small")
SIZE_FRACTION = {"large": 0.3, "small": 0.2}  # shape diameter as a fraction of the image side
CROSS_ARM = 1.0 / 3.0
RING_HOLE = 0.3  # squared inner radius of a ring, relative to the shape radius  # half-width of a cross arm, relative to the shape radius
MAX_SHAPES = 2
DEFAULT_SIZE = 32
TASKS = ("t2i", "caption", "vqa", "edit", "perception", "compose")
EDIT_KINDS = ("recolour", "reshape", "move", "add", "remove", "background")
SPLIT_IDS = {"train": 0, "test": 1, "val": 2}
TEST_FRACTION_TENTHS = 2  # scenes with crc32(key) % 10 below this are held out for the test split
VAL_BUCKET = 2  # scenes with crc32(key) % 10 equal to this are the validation split

NEW_COLOUR, NEW_KIND = "cyan", "ring"  # never in the demo base's training data


@dataclass(frozen=True)
class Vocabulary:
    """The colours and kinds a data set may use (backgrounds, positions and sizes are always all there)."""

    colours: tuple = tuple(COLOURS)
    kinds: tuple = KINDS


FULL = Vocabulary()  # the frozen parts' pretraining data and the fine-tuning sets
BASE = Vocabulary(tuple(c for c in COLOURS if c != NEW_COLOUR), tuple(k for k in KINDS if k != NEW_KIND))

# ---------------------------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class Shape:
    """One shape: kind, colour name, position name and size name."""

    kind: str
    colour: str
    position: str
    size: str = "large"

    def to_dict(self) -> dict:
        """Plain JSON-able dict."""
        return {"kind": self.kind, "colour": self.colour, "position": self.position, "size": self.size}


@dataclass(frozen=True)
class Scene:
    """A background colour name and shapes; shapes are kept sorted left to right."""

    background: str
    shapes: tuple = field(default_factory=tuple)

    def __post_init__(self):
        ordered = tuple(sorted(self.shapes, key=lambda s: (POSITIONS.index(s.position), s.colour, s.kind)))
        object.__setattr__(self, "shapes", ordered)

    def key(self) -> str:
        """Canonical string of the whole scene (used for equality across splits)."""
        parts = [self.background] + [f"{s.size}-{s.colour}-{s.kind}@{s.position}" for s in self.shapes]
        return "|".join(parts)

    def to_dict(self) -> dict:
        """Plain JSON-able dict."""
        return {"background": self.background, "shapes": [s.to_dict() for s in self.shapes]}

    @staticmethod
    def from_dict(d: dict) -> "Scene":
        """Inverse of ``to_dict``."""
        return Scene(d["background"], tuple(Shape(**s) for s in d["shapes"]))

    def at(self, position: str):
        """The shape at a position, or None."""
        return next((s for s in self.shapes if s.position == position), None)


def scene_split(scene: Scene) -> str:
    """'test' or 'val' for the held-out parts of the scene space, else 'train' (stable across runs)."""
    bucket = zlib.crc32(scene.key().encode()) % 10
    if bucket < TEST_FRACTION_TENTHS:
        return "test"
    return "val" if bucket == VAL_BUCKET else "train"


def _pick(rng: np.random.Generator, items):
    """One element of a sequence, drawn with ``rng``."""
    items = list(items)
    return items[int(rng.integers(len(items)))]


def sample_scene(
    rng: np.random.Generator, n_shapes: int | None = None, sizes=("large",), vocab: Vocabulary = FULL
) -> Scene:
    """A random scene of ``n_shapes`` (default 1 or 2) shapes with distinct positions, colours and kinds."""
    n = int(rng.integers(1, MAX_SHAPES + 1)) if n_shapes is None else n_shapes
    positions = rng.permutation(len(POSITIONS))[:n]
    colours = rng.permutation(len(vocab.colours))[:n]
    kinds = rng.permutation(len(vocab.kinds))[:n]
    shapes = tuple(
        Shape(vocab.kinds[k], vocab.colours[c], POSITIONS[p], _pick(rng, sizes))
        for p, c, k in zip(positions, colours, kinds)
    )
    return Scene(_pick(rng, BACKGROUNDS), shapes)


def with_concept(rng: np.random.Generator, scene: Scene, concept: tuple[str, str] | None) -> Scene:
    """``scene`` with one of its shapes given ``concept`` (("colour", "cyan") or ("kind", "ring")), unless a
    shape already has it; the other shapes keep distinct colours and kinds."""
    if concept is None:
        return scene
    attribute, value = concept
    if any(getattr(s, attribute) == value for s in scene.shapes):
        return scene
    shapes = list(scene.shapes)
    i = int(rng.integers(len(shapes)))
    shapes[i] = replace(shapes[i], **{attribute: value})
    return Scene(scene.background, tuple(shapes))


# ------------------------------------------------------------------------------------------- rendering


def _unit_mask(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test for a kind in unit coordinates (u right, v down, the shape fills [-1, 1]^2)."""
    inside_box = (np.abs(u) <= 1) & (np.abs(v) <= 1)
    if kind == "circle":
        return u * u + v * v <= 1
    if kind == "square":
        return inside_box
    if kind == "triangle":  # apex up, base at the bottom
        return inside_box & (np.abs(u) <= (v + 1) / 2)
    if kind == "cross":
        return inside_box & ((np.abs(u) <= CROSS_ARM) | (np.abs(v) <= CROSS_ARM))
    if kind == "ring":  # a disc with a hole of about half its radius
        return (u * u + v * v <= 1) & (u * u + v * v >= RING_HOLE)
    raise ValueError(f"unknown shape kind {kind!r}")


SUPERSAMPLE = 4  # sub-pixel samples per axis; a pixel belongs to a shape when at least half is covered


def shape_centre(position: str, size: int) -> tuple[float, float]:
    """Pixel coordinates (x, y) of the centre of a named position (snapped to the pixel grid)."""
    column = POSITIONS.index(position)
    return float(round((column + 0.5) * size / len(POSITIONS))), float(round(size / 2))


def coverage(kind: str, cx: float, cy: float, rx: float, ry: float, height: int, width: int) -> np.ndarray:
    """[height, width] fraction of each pixel covered by a kind filling the box centre (cx, cy), half-sides rx, ry."""
    n = SUPERSAMPLE
    y, x = (np.mgrid[0 : height * n, 0 : width * n] + 0.5) / n
    inside = _unit_mask(kind, (x - cx) / rx, (y - cy) / ry)
    return inside.reshape(height, n, width, n).mean(axis=(1, 3))


@lru_cache(maxsize=None)
def shape_mask(kind: str, position: str, size_name: str, size: int) -> np.ndarray:
    """[size, size] bool mask of one shape (cached: the world has few distinct shapes; do not modify)."""
    cx, cy = shape_centre(position, size)
    radius = SIZE_FRACTION[size_name] * size / 2
    mask = coverage(kind, cx, cy, radius, radius, size, size) >= 0.5
    mask.flags.writeable = False
    return mask


def label_map(scene: Scene, size: int = DEFAULT_SIZE) -> np.ndarray:
    """[size, size] int array: 0 for background, i + 1 for pixels of ``scene.shapes[i]``."""
    labels = np.zeros((size, size), dtype=np.int64)
    for i, shape in enumerate(scene.shapes):
        labels[shape_mask(shape.kind, shape.position, shape.size, size)] = i + 1
    return labels


def render(scene: Scene, size: int = DEFAULT_SIZE) -> Image.Image:
    """RGB image of a scene."""
    palette = [BACKGROUNDS[scene.background]] + [COLOURS[s.colour] for s in scene.shapes]
    return Image.fromarray(np.asarray(palette, dtype=np.uint8)[label_map(scene, size)], "RGB")


def render_reference(shape: Shape, size: int = DEFAULT_SIZE) -> Image.Image:
    """One shape, centred, on the neutral reference backdrop (compose inputs)."""
    labels = label_map(Scene("black", (Shape(shape.kind, shape.colour, "center", shape.size),)), size)
    palette = np.asarray([REFERENCE_BACKGROUND, COLOURS[shape.colour]], dtype=np.uint8)
    return Image.fromarray(palette[labels], "RGB")


def edge_map(scene: Scene, size: int = DEFAULT_SIZE) -> Image.Image:
    """White 1-px outlines (shape pixels with a 4-neighbour of another label) on black."""
    labels = label_map(scene, size)
    padded = np.pad(labels, 1, constant_values=0)
    centre = padded[1:-1, 1:-1]
    differs = np.zeros_like(centre, dtype=bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        differs |= padded[dy : dy + size, dx : dx + size] != centre
    edges = ((labels > 0) & differs).astype(np.uint8) * 255
    return Image.fromarray(np.stack([edges] * 3, axis=-1), "RGB")


def depth_map(scene: Scene, size: int = DEFAULT_SIZE) -> Image.Image:
    """Depth-like map: brighter is nearer.

    The background is a ground plane, darker at the top (far) than at the bottom (near); every shape is
    a flat plate in front of it, large shapes at 255 and small ones at 192 (larger means nearer).
    """
    labels = label_map(scene, size)
    rows = np.linspace(24, 96, size)[:, None] * np.ones((1, size))
    depth = rows.copy()
    for i, shape in enumerate(scene.shapes):
        depth[labels == i + 1] = 255 if shape.size == "large" else 192
    depth = depth.round().astype(np.uint8)
    return Image.fromarray(np.stack([depth] * 3, axis=-1), "RGB")


# ----------------------------------------------------------------------------------------------- texts

POSITION_PHRASES = {
    "left": ("on the left", "at the left"),
    "center": ("in the center", "in the middle"),
    "right": ("on the right", "at the right"),
}
TO_POSITION = {"left": ("to the left",), "center": ("to the center", "to the middle"), "right": ("to the right",)}
CAPTION_TEMPLATES = (
    "{things} on a {bg} background",
    "there is {things} of a {bg} background",
    "a {bg} background with {things}",
    "{things}, {bg} background",
    "an image of {things} on a {bg} background",
)
VQA_TEMPLATES = {
    "colour": ("what colour is the {kind}?", "what color is the {kind}?", "which colour is the {kind}?"),
    "shape": ("what shape is {where}?", "which shape is {where}?", "what kind of shape is {where}?"),
    "position": ("where is the {colour} {kind}?", "where is the {kind}?", "where is the {colour} shape?"),
    "background": ("what colour is the background?", "what is the background colour?"),
    "count": ("how many shapes are there?", "how many shapes are in the image?"),
    "exists": ("is there a {colour} {kind}?", "is there a {colour} {kind} in the image?"),
}
COUNT_WORDS = {1: "one", 2: "two"}
EDIT_TEMPLATES = {
    "recolour": (
        "make the {kind} {new}",
        "change the colour of the {colour} {kind} to {new}",
        "turn the {colour} {kind} {new}",
        "paint the {kind} {new}",
    ),
    "reshape": (
        "turn the {colour} {kind} into a {new}",
        "change the {kind} into a {new}",
        "replace the {colour} {kind} with a {colour} {new}",
    ),
    "move": ("move the {colour} {kind} {to}", "put the {colour} {kind} {to}", "shift the {kind} {to}"),
    "add": ("add a {thing} {where}", "put a {thing} {where}", "draw a {thing} {where} as well"),
    "remove": ("remove the {colour} {kind}", "delete the {kind}", "take away the {colour} {kind}"),
    "background": ("change the background to {new}", "make the background {new}", "use a {new} background"),
}
EDGE_INSTRUCTIONS = (
    PERCEPTION_PRESETS["canny"],  # the library's preset (what `perceive(model, image, "canny")` sends)
    "Generate the canny edge map of this image.",
    "edge map",
    "Draw the outlines of the shapes.",
    "Show the edges in this image.",
)
DEPTH_INSTRUCTIONS = (
    PERCEPTION_PRESETS["depth"],  # the published instruction, the library's preset
    "depth map",
    "Estimate the depth of this image.",
    "Generate the depth map of this image.",
)
COMPOSE_TEMPLATES = (
    "put this shape {where} of a {bg} background",
    "place this shape {where} on a {bg} background",
    "draw this shape {where}, {bg} background",
    "the shape from the reference {where} on a {bg} background",
)


def shape_phrase(shape: Shape) -> str:
    """'red circle' or 'small red circle' (large is the unmarked default)."""
    prefix = "small " if shape.size == "small" else ""
    return f"{prefix}{shape.colour} {shape.kind}"


def all_captions(scene: Scene, templates=CAPTION_TEMPLATES) -> list[str]:
    """Every wording (template x position phrases) of a scene's caption."""
    phrases = [[f"a {shape_phrase(s)} {p}" for p in POSITION_PHRASES[s.position]] for s in scene.shapes]
    return [
        template.format(things=" and ".join(things), bg=scene.background)
        for template in templates
        for things in itertools.product(*phrases)
    ]


def canonical_caption(scene: Scene) -> str:
    """The one wording captions are written in (first template, first phrase per position), e.g. "a red circle
    on the left and a blue square in the center on a black background".

    Prompts come in every wording (``caption``); the captions the model learns to write (records' ``caption``
    field) use this one, as a captioning data set written in one house style would. A caption drawn from
    dozens of wordings is not a function of the image: with masked diffusion each position then has several
    right words at once, and a sampler that commits positions in parallel mixes wordings ("a a yellow the in
    cross the gray background"); see the shapes report's diagnosis."""
    return all_captions(scene, CAPTION_TEMPLATES[:1])[0]


def caption(scene: Scene, rng: np.random.Generator, templates=CAPTION_TEMPLATES) -> str:
    """A caption naming every shape (colour, kind, position) and the background, in a random wording."""
    return _pick(rng, all_captions(scene, templates))


CONCEPT_QUESTIONS = {"colour": ("colour", "position", "exists"), "kind": ("shape", "position", "exists")}


def vqa(
    scene: Scene,
    rng: np.random.Generator,
    qtype: str | None = None,
    vocab: Vocabulary = FULL,
    concept: tuple[str, str] | None = None,
) -> tuple[str, str, str]:
    """(question, single-word answer, question type) about a scene; with ``concept``, a question about the shape
    that has it, whose question or answer names it."""
    if concept is not None:
        qtype = qtype or _pick(rng, CONCEPT_QUESTIONS[concept[0]])
        template = _pick(rng, VQA_TEMPLATES[qtype])
        shape = next(s for s in scene.shapes if getattr(s, concept[0]) == concept[1])
        answer = {"colour": shape.colour, "shape": shape.kind, "position": shape.position, "exists": "yes"}[qtype]
        where = _pick(rng, POSITION_PHRASES[shape.position])
        return template.format(kind=shape.kind, colour=shape.colour, where=where), answer, qtype
    qtype = qtype or _pick(rng, VQA_TEMPLATES)
    template = _pick(rng, VQA_TEMPLATES[qtype])
    shape = _pick(rng, scene.shapes)
    if qtype == "colour":
        answer = shape.colour
    elif qtype == "shape":
        answer = shape.kind
    elif qtype == "position":
        answer = shape.position
    elif qtype == "background":
        answer = scene.background
    elif qtype == "count":
        answer = COUNT_WORDS[len(scene.shapes)]
    else:  # exists: half the time ask about a colour/kind pair that is absent
        answer = _pick(rng, ("yes", "no"))
        if answer == "no":
            present = {(s.colour, s.kind) for s in scene.shapes}
            absent = [(c, k) for c in vocab.colours for k in vocab.kinds if (c, k) not in present]
            colour, kind = _pick(rng, absent)
            shape = Shape(kind, colour, shape.position)
    where = _pick(rng, POSITION_PHRASES[shape.position])
    question = template.format(kind=shape.kind, colour=shape.colour, where=where)
    return question, answer, qtype


# ----------------------------------------------------------------------------------------------- edits


def _available_edits(scene: Scene) -> list[str]:
    """Edit kinds that make sense for this scene (keeps 1..MAX_SHAPES shapes)."""
    kinds = ["recolour", "reshape", "move", "background"]
    if len(scene.shapes) < MAX_SHAPES:
        kinds.append("add")
    if len(scene.shapes) > 1:
        kinds.append("remove")
    return kinds


EDIT_ATTRIBUTES = {
    "recolour": "colour",
    "reshape": "kind",
    "move": "position",
    "add": "presence",
    "remove": "presence",
    "background": "background",
}


def make_edit(
    rng: np.random.Generator,
    scene: Scene | None = None,
    kind: str | None = None,
    sizes=("large",),
    vocab: Vocabulary = FULL,
    concept: tuple[str, str] | None = None,
):
    """(source scene, instruction, target scene, meta) for one edit.

    With ``concept`` (("colour", "cyan") or ("kind", "ring")) the edit introduces it: a recolour to that
    colour, a reshape into that kind, or an added shape that has it.

    meta = {kind, attribute, shape (the shape acted on; for "add" the new one), from, to}; for add/remove
    the attribute is "presence" going "absent" -> "present" or back; for background edits shape is None.
    """
    src = scene if scene is not None else sample_scene(rng, sizes=sizes, vocab=vocab)
    if concept is not None:  # the source lacks the concept, so the edit can introduce it
        attribute, value = concept
        options = [s for s in (vocab.colours if attribute == "colour" else vocab.kinds) if s != value]
        src = Scene(
            src.background,
            tuple(replace(s, **{attribute: o}) for s, o in zip(src.shapes, _distinct(rng, options, src, attribute))),
        )
        edit_kinds = [
            k for k in ("recolour" if attribute == "colour" else "reshape", "add") if k in _available_edits(src)
        ]
        kind = kind or _pick(rng, edit_kinds)
    kind = kind or _pick(rng, _available_edits(src))
    if kind not in _available_edits(src):
        raise ValueError(f"edit {kind!r} does not apply to a scene with {len(src.shapes)} shape(s)")
    shape = _pick(rng, src.shapes)
    others = [s for s in src.shapes if s != shape]
    free = [p for p in POSITIONS if src.at(p) is None]
    new_colours = [c for c in vocab.colours if c not in {s.colour for s in src.shapes}]
    new_kinds = [k for k in vocab.kinds if k not in {s.kind for s in src.shapes}]
    if concept is not None:
        new_colours = [concept[1]] if concept[0] == "colour" else [c for c in new_colours if c != concept[1]]
        new_kinds = [concept[1]] if concept[0] == "kind" else [k for k in new_kinds if k != concept[1]]
    fmt = {"colour": shape.colour, "kind": shape.kind}
    background, shapes = src.background, others
    if kind == "recolour":
        old, new = shape.colour, _pick(rng, new_colours)
        shapes = others + [replace(shape, colour=new)]
    elif kind == "reshape":
        old, new = shape.kind, _pick(rng, new_kinds)
        shapes = others + [replace(shape, kind=new)]
    elif kind == "move":
        old, new = shape.position, _pick(rng, free)
        shapes = others + [replace(shape, position=new)]
        fmt["to"] = _pick(rng, TO_POSITION[new])
    elif kind == "add":
        old, new = "absent", "present"
        shape = Shape(_pick(rng, new_kinds), _pick(rng, new_colours), _pick(rng, free), _pick(rng, sizes))
        shapes = list(src.shapes) + [shape]
        fmt.update(thing=shape_phrase(shape), where=_pick(rng, POSITION_PHRASES[shape.position]))
    elif kind == "remove":
        old, new = "present", "absent"
    elif kind == "background":
        old, new = src.background, _pick(rng, [b for b in BACKGROUNDS if b != src.background])
        background, shapes, shape = new, list(src.shapes), None
    else:
        raise ValueError(f"unknown edit kind {kind!r}; expected one of {EDIT_KINDS}")
    fmt["new"] = new
    instruction = _pick(rng, EDIT_TEMPLATES[kind]).format(**fmt)
    meta = {
        "kind": kind,
        "attribute": EDIT_ATTRIBUTES[kind],
        "shape": shape.to_dict() if shape else None,
        "from": old,
        "to": new,
    }
    return src, instruction, Scene(background, tuple(shapes)), meta


def _distinct(rng: np.random.Generator, options: list, scene: Scene, attribute: str) -> list:
    """Values for ``attribute`` of each shape of ``scene``: its own where allowed, else a free one from ``options``."""
    taken, values = set(), []
    for s in scene.shapes:
        own = getattr(s, attribute)
        value = own if own in options and own not in taken else _pick(rng, [o for o in options if o not in taken])
        taken.add(value)
        values.append(value)
    return values


# --------------------------------------------------------------------------------------------- records


def _record(
    rng: np.random.Generator, task: str, size: int, sizes, vocab: Vocabulary, concept
) -> tuple[dict, list, Image.Image | None, Scene]:
    """(record without paths, source images, target image or None, scene that decides the split) for one task."""
    if task == "edit":
        src, instruction, tgt, edit_meta = make_edit(rng, sizes=sizes, vocab=vocab, concept=concept)
        rec = {
            "task": task,
            "instruction": instruction,
            "caption": canonical_caption(tgt),
            "meta": {"scene": tgt.to_dict(), "source_scene": src.to_dict(), "edit": edit_meta},
        }
        return rec, [render(src, size)], render(tgt, size), tgt
    scene = with_concept(rng, sample_scene(rng, sizes=sizes, vocab=vocab), concept)
    if task == "t2i":
        rec = {
            "task": task,
            "prompt": caption(scene, rng),
            "caption": canonical_caption(scene),
            "meta": {"scene": scene.to_dict()},
        }
        return rec, [], render(scene, size), scene
    if task == "caption":
        rec = {"task": task, "caption": canonical_caption(scene), "meta": {"scene": scene.to_dict()}}
        return rec, [render(scene, size)], None, scene
    if task == "vqa":
        question, answer, qtype = vqa(scene, rng, vocab=vocab, concept=concept)
        rec = {
            "task": task,
            "prompt": question,
            "caption": answer,
            "meta": {"scene": scene.to_dict(), "question_type": qtype, "answer": answer},
        }
        return rec, [render(scene, size)], None, scene
    if task == "perception":
        kind = _pick(rng, ("edge", "depth"))
        instruction = _pick(rng, EDGE_INSTRUCTIONS if kind == "edge" else DEPTH_INSTRUCTIONS)
        target = (edge_map if kind == "edge" else depth_map)(scene, size)
        text = f"{kind} map of {canonical_caption(scene)}"
        rec = {
            "task": task,
            "instruction": instruction,
            "caption": text,
            "meta": {"scene": scene.to_dict(), "map": kind},
        }
        return rec, [render(scene, size)], target, scene
    if task == "compose":
        shape = next((s for s in scene.shapes if concept and getattr(s, concept[0]) == concept[1]), scene.shapes[0])
        scene = Scene(scene.background, (shape,))
        where = _pick(rng, POSITION_PHRASES[shape.position])
        prompt = _pick(rng, COMPOSE_TEMPLATES).format(where=where, bg=scene.background)
        rec = {
            "task": task,
            "prompt": prompt,
            "caption": canonical_caption(scene),
            "meta": {
                "scene": scene.to_dict(),
                "reference": {"kind": shape.kind, "colour": shape.colour, "size": shape.size},
            },
        }
        return rec, [render_reference(shape, size)], render(scene, size), scene
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def make_record(
    seed: int,
    index: int,
    task: str,
    split: str = "train",
    size: int = DEFAULT_SIZE,
    sizes=("large",),
    vocab: Vocabulary = FULL,
    concept: tuple[str, str] | None = None,
):
    """Deterministic record ``index`` of a split: redraws until its scene belongs to ``split``.

    ``vocab`` limits the colours and kinds drawn; ``concept`` (("colour", "cyan") or ("kind", "ring")) makes
    the record use it (a shape that has it; an edit that introduces it; the question asked about such a shape
    where the question type allows)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, SPLIT_IDS[split], index]))
    while True:
        rec, sources, target, scene = _record(rng, task, size, sizes, vocab, concept)
        if scene_split(scene) == split:
            return rec, sources, target


def _progress(iterable, total: int):
    """tqdm progress bar for long runs, plain iteration otherwise."""
    if total < 500:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc="shapes world")


def make_dataset(
    out_dir,
    n: int,
    seed: int = 0,
    size: int = DEFAULT_SIZE,
    tasks=TASKS,
    split: str = "train",
    sizes=("large",),
    vocab: Vocabulary = FULL,
    concept: tuple[str, str] | None = None,
    name: str | None = None,
) -> str:
    """Write ``n`` records (tasks round-robin) as PNGs plus ``<out_dir>/<split>.jsonl``; return the JSONL path.

    Record format (the native one of ``train/data.py``; paths relative to the JSONL): ``task``; ``prompt``
    (t2i prompt, vqa question, compose prompt) or ``instruction`` (edit, perception); ``sources`` (images the
    model sees: edit/perception source, compose reference, the image to caption or question); ``target`` (the
    image to generate; absent for caption and vqa); ``caption`` (caption of the target, the caption to predict,
    or the single-word vqa answer) and ``meta`` (true attributes: ``scene`` shown by the target, or by the
    only source for caption/vqa/perception, plus task extras).
    """
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLIT_IDS)}")
    name = name or split
    image_dir = os.path.join(out_dir, f"{name}_images")
    os.makedirs(image_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for i in _progress(range(n), n):
            task = tasks[i % len(tasks)]
            rec, sources, target = make_record(seed, i, task, split, size, sizes, vocab, concept)
            rec["sources"] = [_save(img, image_dir, f"{i:06d}_src{j}.png") for j, img in enumerate(sources)]
            if target is not None:
                rec["target"] = _save(target, image_dir, f"{i:06d}_tgt.png")
            f.write(json.dumps(rec, sort_keys=True) + "\n")
    return path


def _save(img: Image.Image, image_dir: str, name: str) -> str:
    """Save a PNG; return its path relative to the JSONL folder."""
    img.save(os.path.join(image_dir, name), compress_level=1)
    return f"{os.path.basename(image_dir)}/{name}"
