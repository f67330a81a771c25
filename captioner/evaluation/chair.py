"""CHAIR: how often captions name objects that are not in the image (Rohrbach et al. 2018, "Object Hallucination in
Image Captioning").

- CHAIR-i: of the objects the captions name (each object once per caption), the share not in their image;
- CHAIR-s: the share of captions that name at least one object not in their image.

Objects are recognised through a vocabulary of classes and their synonyms: COCO's 80 classes with the synonym list
the paper published (`data/coco_synonyms.txt`; plurals too), or the user's own (a JSON file, class -> synonyms), or,
by default for other annotations, the object names the annotations use. As in the paper, a few two-word phrases are
read as one object ("hot dog", "teddy bear"), a qualifier does not make another object ("baby elephant" is an
elephant, not a person; "passenger train" a train), and an image's objects are its annotated ones together with
those its reference captions name (`with_references`).

Per-image objects come from COCO `instances_*.json` (category names by image), a JSON file mapping file names (or
image ids) to lists of object names, or a COCO captions file whose images carry an `objects` list (the demo's scenes
do: the shapes and colours drawn).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from captioner.core.errors import CaptionerError
from captioner.core.files import read_json

COCO_SYNONYMS = Path(__file__).parent / "data" / "coco_synonyms.txt"
# Read as one object: pairs whose words would otherwise name other objects (or none).
COCO_PHRASES = {
    "motor bike": "motorcycle",
    "motor cycle": "motorcycle",
    "air plane": "airplane",
    "bow tie": "tie",
    "toilet seat": "toilet",
    "hot dog": "hot dog",
    "teddy bear": "teddy bear",
}
# A qualifier before these names the same object ("baby bird" is a bird, not a person).
QUALIFIED = {
    "baby": ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub"),
    "adult": ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub"),
    "passenger": ("jet", "train"),
}
WORD = re.compile(r"[a-z]+")


def singular(word: str) -> str:
    """English plural to singular for object nouns (people -> person, boxes -> box, knives -> knife, ...)."""
    irregular = {
        "people": "person",
        "men": "man",
        "women": "woman",
        "children": "child",
        "mice": "mouse",
        "geese": "goose",
        "teeth": "tooth",
        "feet": "foot",
        "knives": "knife",
        "leaves": "leaf",
        "skis": "ski",
        "glasses": "glass",
        "buses": "bus",
        "dice": "die",
    }
    if word in irregular:
        return irregular[word]
    if len(word) <= 3 or word.endswith(("ss", "us", "is")):
        return word
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "sses", "oes")):
        return word[:-2]
    if word.endswith("s"):
        return word[:-1]
    return word


def _words(text: str) -> list[str]:
    return [singular(word) for word in WORD.findall(text.lower())]


@dataclass(frozen=True)
class ObjectVocabulary:
    """Object classes and the words or phrases that name them.

    Attributes:
        names: Each name (singular words joined by one space) -> its class.
        qualified: Qualifier words -> the names after which they do not start another object.
    """

    names: Mapping[str, str]
    qualified: Mapping[str, tuple[str, ...]]

    @classmethod
    def coco(cls) -> ObjectVocabulary:
        """COCO's 80 classes with the paper's synonyms."""
        lines = [
            line
            for line in COCO_SYNONYMS.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.startswith("#")
        ]
        synonyms = {}
        for line in lines:
            entries = [entry.strip() for entry in line.split(",") if entry.strip()]
            synonyms[entries[0]] = entries
        return cls.from_synonyms(synonyms, COCO_PHRASES, QUALIFIED)

    @classmethod
    def from_synonyms(
        cls,
        synonyms: Mapping[str, Iterable[str]],
        phrases: Mapping[str, str] | None = None,
        qualified: Mapping[str, tuple[str, ...]] | None = None,
    ) -> ObjectVocabulary:
        """Classes -> their synonyms (each class names itself too); `phrases` read as the class given."""
        names: dict[str, str] = {}
        for name, words in synonyms.items():
            for word in [name, *words]:
                names[" ".join(_words(word))] = name
        for phrase, name in (phrases or {}).items():
            names[" ".join(_words(phrase))] = name
        return cls(names, {word: tuple(map(singular, after)) for word, after in (qualified or {}).items()})

    @classmethod
    def from_file(cls, path: str | Path) -> ObjectVocabulary:
        """A JSON file mapping each class to its synonyms (`{"dog": ["puppy", "hound"], ...}`).

        Raises:
            CaptionerError: When it cannot be read or is not such a mapping.
        """
        payload = read_json(path, "The object vocabulary")
        valid = isinstance(payload, dict) and all(
            isinstance(words, list) and all(isinstance(w, str) for w in words) for words in payload.values()
        )
        if not valid:
            raise CaptionerError(
                f"The object vocabulary {path} must map each class to a list of synonyms, as "
                '{"dog": ["puppy", "hound"]}.'
            )
        return cls.from_synonyms(payload)

    def objects_in(self, caption: str) -> list[str]:
        """The classes a caption names, each once, in order (the longest name wins: "hot dog" is not a dog)."""
        words = _words(caption)
        longest = max((len(name.split()) for name in self.names), default=1)
        found: list[str] = []
        index = 0
        while index < len(words):
            for size in range(min(longest, len(words) - index), 0, -1):
                name = " ".join(words[index : index + size])
                if name in self.names:
                    after = words[index + size] if index + size < len(words) else None
                    if size == 1 and after is not None and after in self.qualified.get(words[index], ()):
                        break  # "baby elephant": the next word names the object
                    if self.names[name] not in found:
                        found.append(self.names[name])
                    index += size - 1
                    break
            index += 1
        return found

    def classes(self, names: Iterable[str]) -> set[str]:
        """Annotated object names as classes (a name the vocabulary does not know stays as it is)."""
        return {self.names.get(" ".join(_words(name)), name) for name in names}


def chair_scores(
    captions: Mapping[str, str],
    objects: Mapping[str, Iterable[str]],
    vocabulary: ObjectVocabulary,
    references: Mapping[str, Sequence[str]] | None = None,
) -> dict:
    """CHAIR-i and CHAIR-s (0-100) of `captions` against each image's objects.

    Args:
        captions: Image -> generated caption. Images without objects are left out (and counted).
        objects: Image -> the object names annotated in it.
        vocabulary: What names an object.
        references: Image -> reference captions: the objects they name count as present too (the paper's rule).

    Returns:
        `CHAIR-i`, `CHAIR-s`, the counts behind them, and each caption's hallucinated objects (`hallucinated`).
    """
    mentioned = hallucinated_count = with_hallucination = scored = 0
    hallucinated: dict[str, list[str]] = {}
    for image, caption in captions.items():
        if image not in objects:
            continue
        present = vocabulary.classes(objects[image])
        for reference in (references or {}).get(image, ()):
            present.update(vocabulary.objects_in(reference))
        named = vocabulary.objects_in(caption)
        wrong = [name for name in named if name not in present]
        scored += 1
        mentioned += len(named)
        hallucinated_count += len(wrong)
        with_hallucination += bool(wrong)
        if wrong:
            hallucinated[image] = wrong
    return {
        "CHAIR-i": 100.0 * hallucinated_count / mentioned if mentioned else 0.0,
        "CHAIR-s": 100.0 * with_hallucination / scored if scored else 0.0,
        "captions": scored,
        "without_objects": len(captions) - scored,
        "objects_named": mentioned,
        "objects_hallucinated": hallucinated_count,
        "hallucinated": hallucinated,
    }


def read_objects(path: str | Path) -> tuple[dict[str, list[str]], bool]:
    """Per-image object names from COCO instances, a JSON mapping, or a captions file whose images list them.

    Returns:
        Image (file name, and image id as text where the file gives one) -> object names; and whether they are COCO
        classes (instances files), whose vocabulary is COCO's.

    Raises:
        CaptionerError: When the file cannot be read or holds none of these.
    """
    payload = read_json(path, "The object annotations")
    if isinstance(payload, dict) and "categories" in payload and "annotations" in payload:
        categories = {category["id"]: category["name"] for category in payload["categories"]}
        names = {image["id"]: image["file_name"] for image in payload.get("images", [])}
        objects: dict[str, list[str]] = {}
        for annotation in payload["annotations"]:
            name = categories.get(annotation.get("category_id"))
            if name is None:
                continue
            for key in {str(annotation["image_id"]), names.get(annotation["image_id"])} - {None}:
                objects.setdefault(key, [])
                if name not in objects[key]:
                    objects[key].append(name)
        return objects, True
    if isinstance(payload, dict) and "images" in payload:
        objects = {}
        for image in payload["images"]:
            if isinstance(image.get("objects"), list):
                objects[image["file_name"]] = list(image["objects"])
                if "id" in image:
                    objects[str(image["id"])] = list(image["objects"])
        if objects:
            return objects, False
    if isinstance(payload, dict) and all(isinstance(value, list) for value in payload.values()):
        return {str(key): list(value) for key, value in payload.items()}, False
    raise CaptionerError(
        f"{path} holds no object annotations: give COCO instances_*.json, a JSON object mapping "
        'file names to object lists ({"a.jpg": ["dog", "frisbee"]}), or a captions file whose '
        "images carry an objects list."
    )


def vocabulary_for(objects: Mapping[str, Iterable[str]], coco: bool, vocabulary: str | Path | None) -> ObjectVocabulary:
    """The vocabulary to read captions with: a file, COCO's ("coco"), or (default) COCO's for COCO classes, else the
    annotations' own object names."""
    if vocabulary == "coco" or (vocabulary is None and coco):
        return ObjectVocabulary.coco()
    if vocabulary is not None:
        return ObjectVocabulary.from_file(vocabulary)
    names = {name for listed in objects.values() for name in listed}
    return ObjectVocabulary.from_synonyms({name: [] for name in names})
