"""The Objects365 -> COCO table is consistent with both label sets."""

import pytest

from dino_d2.data.objects365_classes import OBJECTS365_V1_CLASSES, OBJECTS365_V2_CLASSES
from dino_d2.data.objects365_coco_map import (
    COCO_FROM_OBJECTS365,
    COCO_UNMATCHED,
    coco_thing_classes,
    objects365_to_coco_rows,
)


def test_every_target_is_a_coco_class_and_the_unmatched_are_the_rest():
    coco = coco_thing_classes()
    assert len(coco) == 80
    assert set(COCO_FROM_OBJECTS365) <= set(coco)
    assert set(COCO_UNMATCHED) == set(coco) - set(COCO_FROM_OBJECTS365)
    assert all(reason.strip() for reason in COCO_UNMATCHED.values())


@pytest.mark.parametrize(
    "position, names", [(0, OBJECTS365_V2_CLASSES), (1, OBJECTS365_V1_CLASSES)]
)
def test_every_source_is_a_class_of_its_version_and_used_once(position, names):
    sources = [pair[position] for pair in COCO_FROM_OBJECTS365.values()]
    assert not set(sources) - set(names), set(sources) - set(names)
    assert len(set(sources)) == len(sources)


def test_the_near_synonym_decisions():
    assert COCO_FROM_OBJECTS365["tv"] == ("Moniter/TV", "tv")
    assert COCO_FROM_OBJECTS365["handbag"] == ("Handbag/Satchel", "handbag")
    assert COCO_FROM_OBJECTS365["dining table"] == ("Dinning Table", "dining table")
    assert "sports ball" in COCO_UNMATCHED


@pytest.mark.parametrize(
    "version, names", [("v2", OBJECTS365_V2_CLASSES), ("v1", OBJECTS365_V1_CLASSES)]
)
def test_rows_follow_coco_order(version, names):
    rows = objects365_to_coco_rows(version)
    coco = coco_thing_classes()
    assert len(rows) == 80
    for j, row in enumerate(rows):
        if coco[j] in COCO_UNMATCHED:
            assert row is None
        else:
            assert names[row] == COCO_FROM_OBJECTS365[coco[j]][0 if version == "v2" else 1]
    assert rows[coco.index("person")] == 0  # Person is Objects365's first category in both


def test_unknown_version():
    with pytest.raises(ValueError, match="'v3' is not one of"):
        objects365_to_coco_rows("v3")
