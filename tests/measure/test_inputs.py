"""The benchmark's inputs: random training batches and batches padded for an export."""

import torch

from dino_d2.measure import padded_batch, random_batches


def test_random_training_batch():
    batches = random_batches(3, 2, 60, 90, num_boxes=4, num_classes=7, seed=1)
    assert len(batches) == 3 and batches[0] is batches[2] and len(batches[0]) == 2
    for item in batches[0]:
        assert item["image"].shape == (3, 60, 90) and 0 <= item["image"].min()
        assert item["image"].max() <= 255
        instances = item["instances"]
        boxes = instances.gt_boxes.tensor
        assert instances.image_size == (60, 90) and boxes.shape == (4, 4)
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 90).all() and (boxes[:, 3] <= 60).all()
        assert ((boxes[:, 2:] - boxes[:, :2]) >= torch.tensor([90, 60]) / 20 - 1e-4).all()
        assert instances.gt_classes.dtype == torch.int64
        assert 0 <= instances.gt_classes.min() and instances.gt_classes.max() < 7
    assert "instances" not in random_batches(1, 1, 8, 8)[0][0]


def test_padded_batch_holds_integer_pixels_in_the_top_left_corner():
    batch = random_batches(1, 2, 96, 80)[0]
    # Integer pixels, as a uint8 image holds; padded into one batch for an export.
    images, sizes = padded_batch(random_batches(1, 1, 50, 70)[0] + batch)
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 96, 80)
    assert sizes.tolist() == [[50, 70], [96, 80], [96, 80]]
    assert torch.equal(images[1].float(), batch[0]["image"]) and not images[0, :, 50:].any()
