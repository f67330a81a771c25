"""Procedural scenes with true captions, written in the Mini-COCO layout.

The offline demo and the tests train on these: one main object (a shape with a
colour, a size and a position) on a plain or textured background, sometimes
with a smaller second object. Five captions per image are drawn from varied
templates that all describe the scene truthfully. The scene's attributes are
stored in `images[].scene` (ignored by the parser) so evaluations can check
what the model says against the truth. With `styles`, each scene's captions
come in three styles instead (`captioner.text.styles`), two of each: short
("a small yellow square"), long (every attribute in a sentence) and tags
("yellow, square, small, top, dotted background").
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

from PIL import Image, ImageDraw

from captioner.core.files import atomic_folder

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 20),
    "purple": (140, 40, 180),
    "orange": (250, 140, 0),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.22, "large": 0.42}
POSITIONS = {
    "left": ((0.27, 0.5), "on the left"),
    "right": ((0.73, 0.5), "on the right"),
    "top": ((0.5, 0.27), "at the top"),
    "bottom": ((0.5, 0.73), "at the bottom"),
    "middle": ((0.5, 0.5), "in the middle"),
}
BACKGROUNDS = {"white": (245, 245, 245), "grey": (150, 150, 150), "striped": None, "dotted": None}
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "middle": "top"}

CAPTION_FILE, IMAGES_DIR = "captions.json", "Images"


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, centre: tuple[float, float], radius: float, fill: tuple) -> None:
    x, y = centre
    if shape == "circle":
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=fill)
    elif shape == "square":
        side = radius * 0.9
        draw.rectangle((x - side, y - side, x + side, y + side), fill=fill)
    else:
        draw.polygon([(x, y - radius), (x - radius, y + radius * 0.8), (x + radius, y + radius * 0.8)], fill=fill)


def _background(kind: str, width: int, height: int, rng: random.Random) -> Image.Image:
    if BACKGROUNDS[kind] is not None:
        shade = tuple(min(255, max(0, c + rng.randint(-10, 10))) for c in BACKGROUNDS[kind])
        return Image.new("RGB", (width, height), shade)
    image = Image.new("RGB", (width, height), (225, 225, 215))
    draw = ImageDraw.Draw(image)
    step = rng.randint(8, 14)
    if kind == "striped":
        for x in range(-height, width, step):
            draw.line((x, 0, x + height, height), fill=(120, 120, 120), width=2)
    else:
        for x in range(step // 2, width, step):
            for y in range(step // 2, height, step):
                draw.ellipse((x - 1.5, y - 1.5, x + 1.5, y + 1.5), fill=(110, 110, 110))
    return image


def random_scene(rng: random.Random) -> dict:
    """Draw the attributes of one scene."""
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    scene = {
        "colour": colour,
        "shape": shape,
        "size": rng.choice(list(SIZES)),
        "position": rng.choice(list(POSITIONS)),
        "background": rng.choice(list(BACKGROUNDS)),
        "second": None,
    }
    if rng.random() < 0.4:
        scene["second"] = {
            "colour": rng.choice([c for c in COLOURS if c != colour]),
            "shape": rng.choice([s for s in SHAPES if s != shape]),
        }
    return scene


def render_scene(scene: dict, width: int, height: int, rng: random.Random) -> Image.Image:
    """Paint a scene; positions and sizes jitter a little so no two images are alike."""
    image = _background(scene["background"], width, height, rng)
    draw = ImageDraw.Draw(image)
    scale = min(width, height)
    if scene["second"] is not None:
        (cx, cy), _ = POSITIONS[OPPOSITE[scene["position"]]]
        centre = (cx * width + rng.uniform(-4, 4), cy * height + rng.uniform(-4, 4))
        _draw_shape(draw, scene["second"]["shape"], centre, 0.12 * scale, COLOURS[scene["second"]["colour"]])
    (cx, cy), _ = POSITIONS[scene["position"]]
    centre = (cx * width + rng.uniform(-0.04, 0.04) * width, cy * height + rng.uniform(-0.04, 0.04) * height)
    radius = SIZES[scene["size"]] * scale * rng.uniform(0.9, 1.1) / 2 * 1.6
    _draw_shape(draw, scene["shape"], centre, radius, COLOURS[scene["colour"]])
    return image


def describe_scene(scene: dict, rng: random.Random, count: int = 5) -> list[str]:
    """`count` different true captions of a scene, from varied templates."""
    c, s, z, bg = scene["colour"], scene["shape"], scene["size"], scene["background"]
    where = POSITIONS[scene["position"]][1]
    templates = [
        f"a {z} {c} {s} {where}",
        f"a {c} {s} on a {bg} background",
        f"there is a {c} {s} {where} of the picture",
        f"a {z} {c} {s} on a {bg} background",
        f"a picture of a {c} {s}",
        f"the {c} {s} is {where}",
    ]
    if scene["second"] is not None:
        c2, s2 = scene["second"]["colour"], scene["second"]["shape"]
        templates += [f"a {z} {c} {s} and a small {c2} {s2}", f"a {c} {s} next to a {c2} {s2}"]
    else:
        templates += [f"a single {c} {s} {where}"]
    chosen = rng.sample(templates, count)
    return [caption[0].upper() + caption[1:] + rng.choice([".", "", " ."]) for caption in chosen]


def styled_captions(scene: dict, rng: random.Random) -> list[tuple[str, str]]:
    """Two true captions of a scene in each of three styles, as (style, caption): short, long and tags."""
    c, s, z, bg = scene["colour"], scene["shape"], scene["size"], scene["background"]
    where = POSITIONS[scene["position"]][1]
    second = scene["second"]
    short = rng.sample([f"a {c} {s}", f"a {z} {c} {s}", f"the {c} {s}"], 2)
    long = [
        f"a {z} {c} {s} {where} of the picture, on a {bg} background",
        f"there is a {z} {c} {s} {where}, drawn on a {bg} background",
    ]
    tags = [c, s, z, scene["position"], f"{bg} background"]
    if second is not None:
        long = [f"{caption}, with a small {second['colour']} {second['shape']}" for caption in long]
        tags.append(f"{second['colour']} {second['shape']}")
    reordered = [s, c, *tags[2:]]
    return (
        [("short", caption) for caption in short]
        + [("long", caption) for caption in long]
        + [("tags", ", ".join(tags)), ("tags", ", ".join(reordered))]
    )


def write_synthetic_dataset(
    root: str | Path,
    num_images: int = 1000,
    seed: int = 0,
    width: int = 160,
    height: int = 120,
    styles: bool = False,
) -> Path:
    """Write `num_images` scenes as `root/captions.json` and `root/Images/*.jpg`.

    The folder appears complete or not at all: everything is written into a
    temporary sibling folder that is renamed into place at the end.

    Args:
        root: The dataset folder to create (must not exist).
        num_images: How many scenes.
        seed: Makes the set reproducible.
        width: Image width in pixels.
        height: Image height in pixels.
        styles: Write captions in three styles, each annotation with its `style` (short, long, tags).

    Returns:
        `root`.
    """
    root = Path(root)
    rng = random.Random(seed)
    with atomic_folder(root) as tmp:
        (tmp / IMAGES_DIR).mkdir()
        images, annotations = [], []
        for image_id in range(1, num_images + 1):
            scene = random_scene(rng)
            file_name = f"SYNTH_scenes_{image_id:012d}.jpg"
            render_scene(scene, width, height, rng).save(tmp / IMAGES_DIR / file_name, quality=90)
            images.append(
                {
                    "id": image_id,
                    "file_name": file_name,
                    "width": width,
                    "height": height,
                    "scene": scene,
                    "objects": scene_objects(scene),
                }
            )
            if styles:
                for style, caption in styled_captions(scene, rng):
                    annotation = {"id": len(annotations) + 1, "image_id": image_id, "caption": caption, "style": style}
                    annotations.append(annotation)
                continue
            for caption in describe_scene(scene, rng):
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "caption": caption})
        with (tmp / CAPTION_FILE).open("w", encoding="utf-8") as handle:
            json.dump({"images": images, "annotations": annotations}, handle)
    return root


def scene_objects(scene: dict) -> list[str]:
    """What a scene draws, as object names for CHAIR (`captioner.evaluation.chair`): its shapes and their colours."""
    drawn = [scene, *([scene["second"]] if scene.get("second") else [])]
    return list(dict.fromkeys([part["shape"] for part in drawn] + [part["colour"] for part in drawn]))


def scenes_of(captions_file: str | Path) -> dict[str, dict]:
    """Map each file name of a synthetic set to the scene that was drawn."""
    with open(captions_file, encoding="utf-8") as handle:
        payload = json.load(handle)
    return {image["file_name"]: image["scene"] for image in payload["images"] if "scene" in image}


def scene_colours(captions_file: str | Path) -> dict[str, str]:
    """Map each file name of a synthetic set to its main object's colour."""
    return {name: scene["colour"] for name, scene in scenes_of(captions_file).items()}


def mentioned_position(caption: str) -> str | None:
    """The main object's position a caption states ("on the left" -> "left"), if it states one."""
    text = " ".join(caption.lower().split())
    for position, (_, phrase) in POSITIONS.items():
        if phrase in text:
            return position
    return None


def first_colour(caption: str) -> str | None:
    """The first colour word of a caption (the main object's colour in this grammar)."""
    for word in caption.lower().split():
        if word in COLOURS:
            return word
    return None


def write_synthetic_shards(coco_root: str | Path, root: str | Path, per_shard: int = 100, junk: bool = False) -> Path:
    """A synthetic set (`write_synthetic_dataset`'s layout) rewritten as img2dataset's WebDataset output: `root/`
    with `00000.tar`, ... holding `<key>.jpg`, `<key>.txt` (the captions, one per line) and `<key>.json` (the
    original file name and the scene), and a `<shard>_stats.json` beside each, as img2dataset writes. The keys are
    the image files' stems, so the shards split exactly as the folder does (`captioner.data.splits`).

    Args:
        coco_root: The synthetic set to rewrite (its images and captions, unchanged).
        root: The folder to create (written whole, then renamed into place).
        per_shard: Images per shard.
        junk: Also write what real shards hold: an image without a caption, a caption without an image, a JPEG
            cut short, and one key a second time (in the last shard).

    Returns:
        `root`.
    """
    coco_root, root = Path(coco_root), Path(root)
    payload = json.loads((coco_root / CAPTION_FILE).read_text(encoding="utf-8"))
    captions: dict[int, list[str]] = {}
    for annotation in payload["annotations"]:
        captions.setdefault(annotation["image_id"], []).append(annotation["caption"])
    samples = []
    for image in payload["images"]:
        key = Path(image["file_name"]).stem  # the file's stem: the folder and the shards split the same images
        meta = {
            "key": key,
            "file_name": image["file_name"],
            "scene": image.get("scene"),
            "status": "success",
        }
        samples.append(
            (
                key,
                {
                    "jpg": (coco_root / IMAGES_DIR / image["file_name"]).read_bytes(),
                    "txt": "\n".join(captions.get(image["id"], [])).encode(),
                    "json": json.dumps(meta).encode(),
                },
            )
        )
    if junk:
        good = samples[0][1]
        samples += [
            ("junk-no-caption", {"jpg": good["jpg"]}),
            ("junk-no-image", {"txt": b"a caption alone"}),
            ("junk-cut-short", {"jpg": good["jpg"][: len(good["jpg"]) // 3], "txt": b"a red circle"}),
            (samples[0][0], dict(good)),
        ]
    with atomic_folder(root) as tmp:
        for shard, start in enumerate(range(0, len(samples), per_shard)):
            name = f"{shard:05d}"
            with tarfile.open(tmp / f"{name}.tar", "w") as tar:
                for key, members in samples[start : start + per_shard]:
                    for extension, data in members.items():
                        info = tarfile.TarInfo(f"{key}.{extension}")
                        info.size, info.mtime = len(data), 0
                        tar.addfile(info, io.BytesIO(data))
            count = len(samples[start : start + per_shard])
            (tmp / f"{name}_stats.json").write_text(json.dumps({"count": count, "successes": count}))
    return root


def write_caption_shards(root: str | Path, count: int, per_shard: int = 10_000, seed: int = 0) -> Path:
    """`count` captions-only samples as img2dataset-style shards (`<key>.jpg` + `<key>.txt`), every image the same
    tiny JPEG: a set of web scale in records and in files, small on disk, for measuring the records pass.

    Returns:
        `root`, written whole (the shards appear together when complete).
    """
    rng = random.Random(seed)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="JPEG")
    image = buffer.getvalue()
    words = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
    with atomic_folder(root) as tmp:
        for shard, start in enumerate(range(0, count, per_shard)):
            with tarfile.open(tmp / f"{shard:05d}.tar", "w") as tar:
                for index in range(start, min(start + per_shard, count)):
                    caption = f"a {rng.choice(words)} next to a {rng.choice(words)} number {index % 997}".encode()
                    for extension, data in (("jpg", image), ("txt", caption)):
                        info = tarfile.TarInfo(f"{index:09d}.{extension}")
                        info.size, info.mtime = len(data), 0
                        tar.addfile(info, io.BytesIO(data))
    return Path(root)
