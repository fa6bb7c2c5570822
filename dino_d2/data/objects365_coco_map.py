"""Which Objects365 class each COCO class is initialised from when fine-tuning on COCO.

A detector pre-trained on Objects365 (365 classes) is fine-tuned on COCO (80 classes) with its
class heads gathered by this table: COCO class ``j`` starts from the rows of the Objects365 class
the table names for it (see :mod:`dino_d2.checkpoint.class_map`). The table is keyed by the COCO
names of Detectron2 (``COCO_CATEGORIES``, contiguous order); each value names the Objects365 v2
and v1 class, spelled exactly as in :mod:`dino_d2.data.objects365_classes`.

Most entries are the same object under the same name (up to case). The decisions for the others:

* ``tv`` <- v2 ``Moniter/TV`` (the json's spelling), v1 ``tv``.
* ``handbag`` <- v2 ``Handbag/Satchel``; ``bowl`` <- v2 ``Bowl/Basin``;
  ``orange`` <- v2 ``Orange/Tangerine`` (v1 has ``orange`` and ``tangerine``: ``orange``).
* ``dining table`` <- v2 ``Dinning Table`` (the json's spelling), v1 ``dining table``; not
  ``Desk``, ``Coffee Table`` or ``Side Table``, which COCO does not count as dining tables.
* ``bird`` <- ``Wild Bird``: COCO's bird covers every bird; Objects365 splits out ``Pigeon``,
  ``Duck``, ``Goose``, ``Swan``, ``Penguin``, ``Parrot``, ``Chicken`` (and v1 ``eagle``), and
  ``Wild Bird`` is its generic class.
* ``truck`` <- ``Truck``, not ``Pickup Truck``, ``Heavy Truck``, ``Fire Truck`` or
  ``Machinery Vehicle``; ``boat`` <- ``Boat``, not ``Sailboat`` or ``Ship``.
* ``suitcase`` <- v2 ``Luggage`` (v2 has no suitcase class; ``Briefcase`` is a smaller bag),
  v1 ``suitcase`` (v1 has both ``suitcase`` and ``luggage``).
* ``skis`` <- v2 ``Skiboard``, v1 ``skis``.
* ``teddy bear`` <- v2 ``Stuffed Toy``, v1 ``teddy bear``.
* ``hair drier`` <- v2 ``Hair Dryer``, v1 ``hair drier``.

COCO classes without an Objects365 counterpart are listed in :data:`COCO_UNMATCHED` with the
reason; they keep their fresh initialisation.
"""

from typing import Dict, List, Optional, Tuple

from .objects365_classes import OBJECTS365_CLASSES

__all__ = [
    "COCO_FROM_OBJECTS365",
    "COCO_UNMATCHED",
    "coco_thing_classes",
    "objects365_to_coco_rows",
]

# COCO class -> (Objects365 v2 class, Objects365 v1 class).
COCO_FROM_OBJECTS365: Dict[str, Tuple[str, str]] = {
    "person": ("Person", "person"),
    "bicycle": ("Bicycle", "bicycle"),
    "car": ("Car", "car"),
    "motorcycle": ("Motorcycle", "motorcycle"),
    "airplane": ("Airplane", "airplane"),
    "bus": ("Bus", "bus"),
    "train": ("Train", "train"),
    "truck": ("Truck", "truck"),
    "boat": ("Boat", "boat"),
    "traffic light": ("Traffic Light", "traffic light"),
    "fire hydrant": ("Fire Hydrant", "fire hydrant"),
    "stop sign": ("Stop Sign", "stop sign"),
    "parking meter": ("Parking meter", "parking meter"),
    "bench": ("Bench", "bench"),
    "bird": ("Wild Bird", "wild bird"),
    "cat": ("Cat", "cat"),
    "dog": ("Dog", "dog"),
    "horse": ("Horse", "horse"),
    "sheep": ("Sheep", "sheep"),
    "cow": ("Cow", "cow"),
    "elephant": ("Elephant", "elephant"),
    "bear": ("Bear", "bear"),
    "zebra": ("Zebra", "zebra"),
    "giraffe": ("Giraffe", "giraffe"),
    "backpack": ("Backpack", "backpack"),
    "umbrella": ("Umbrella", "umbrella"),
    "handbag": ("Handbag/Satchel", "handbag"),
    "tie": ("Tie", "tie"),
    "suitcase": ("Luggage", "suitcase"),
    "frisbee": ("Frisbee", "frisbee"),
    "skis": ("Skiboard", "skis"),
    "snowboard": ("Snowboard", "snowboard"),
    "kite": ("Kite", "kite"),
    "baseball bat": ("Baseball Bat", "baseball bat"),
    "baseball glove": ("Baseball Glove", "baseball glove"),
    "skateboard": ("Skateboard", "skateboard"),
    "surfboard": ("Surfboard", "surfboard"),
    "tennis racket": ("Tennis Racket", "tennis racket"),
    "bottle": ("Bottle", "bottle"),
    "wine glass": ("Wine Glass", "wine glass"),
    "cup": ("Cup", "cup"),
    "fork": ("Fork", "fork"),
    "knife": ("Knife", "knife"),
    "spoon": ("Spoon", "spoon"),
    "bowl": ("Bowl/Basin", "bowl"),
    "banana": ("Banana", "banana"),
    "apple": ("Apple", "apple"),
    "sandwich": ("Sandwich", "sandwich"),
    "orange": ("Orange/Tangerine", "orange"),
    "broccoli": ("Broccoli", "broccoli"),
    "carrot": ("Carrot", "carrot"),
    "hot dog": ("Hot dog", "hot dog"),
    "pizza": ("Pizza", "pizza"),
    "donut": ("Donut", "donut"),
    "cake": ("Cake", "cake"),
    "chair": ("Chair", "chair"),
    "couch": ("Couch", "couch"),
    "potted plant": ("Potted Plant", "potted plant"),
    "bed": ("Bed", "bed"),
    "dining table": ("Dinning Table", "dining table"),
    "toilet": ("Toilet", "toilet"),
    "tv": ("Moniter/TV", "tv"),
    "laptop": ("Laptop", "laptop"),
    "mouse": ("Mouse", "mouse"),
    "remote": ("Remote", "remote"),
    "keyboard": ("Keyboard", "keyboard"),
    "cell phone": ("Cell Phone", "cell phone"),
    "microwave": ("Microwave", "microwave"),
    "oven": ("Oven", "oven"),
    "toaster": ("Toaster", "toaster"),
    "sink": ("Sink", "sink"),
    "refrigerator": ("Refrigerator", "refrigerator"),
    "book": ("Book", "book"),
    "clock": ("Clock", "clock"),
    "vase": ("Vase", "vase"),
    "scissors": ("Scissors", "scissors"),
    "teddy bear": ("Stuffed Toy", "teddy bear"),
    "hair drier": ("Hair Dryer", "hair drier"),
    "toothbrush": ("Toothbrush", "toothbrush"),
}

# COCO classes left at their fresh initialisation, and why.
COCO_UNMATCHED: Dict[str, str] = {
    "sports ball": (
        "Objects365 splits balls by sport (Soccer, Basketball, Baseball, Volleyball, Tennis, "
        "Golf Ball, American Football, v2 Other Balls, ...); no one of them stands for COCO's "
        "class of every ball"
    ),
}

# Version -> the position of its class in a COCO_FROM_OBJECTS365 value.
_POSITION = {"v2": 0, "v1": 1}


def coco_thing_classes() -> List[str]:
    """The 80 COCO class names in Detectron2's contiguous order (``COCO_CATEGORIES``)."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    return [c["name"] for c in COCO_CATEGORIES if c["isthing"]]


def objects365_to_coco_rows(version: str) -> List[Optional[int]]:
    """For each COCO class, the Objects365 class whose head rows initialise it.

    Args:
        version: ``"v1"`` or ``"v2"``: the Objects365 version the checkpoint was trained on.

    Returns:
        a list of 80 entries in COCO's contiguous order: entry ``j`` is the contiguous
        Objects365 class index (``0..364``) of COCO class ``j``, or None for the classes of
        :data:`COCO_UNMATCHED`.

    Raises:
        ValueError: an unknown ``version``.
    """
    if version not in _POSITION:
        raise ValueError(f"Objects365 version {version!r} is not one of {sorted(_POSITION)}")
    position = _POSITION[version]
    index = {name: i for i, name in enumerate(OBJECTS365_CLASSES[version])}
    rows = []
    for coco_name in coco_thing_classes():
        pair = COCO_FROM_OBJECTS365.get(coco_name)
        rows.append(None if pair is None else index[pair[position]])
    return rows
