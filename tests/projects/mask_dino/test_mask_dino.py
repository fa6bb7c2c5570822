"""Mask DINO built from config edits of the tiny DINO: its outputs, training and inference."""

import torch

from detectron2.config import instantiate


def test_mask_outputs_for_every_query_set(tiny_mask_dino_config, rectangles_batch):
    cfg = tiny_mask_dino_config(decoder_layers=2)
    model = instantiate(cfg.model).train()
    batch = rectangles_batch()
    captured = {}
    model.criterion.register_forward_hook(lambda m, args, out: captured.update(outputs=args[0]))
    torch.manual_seed(0)
    losses = model(batch)
    outputs = captured["outputs"]
    masks = outputs.extras["mask_logits"]
    num_dn = outputs.num_dn
    assert num_dn > 0
    # (L_dec, N, Q_dn + Q, H/4, W/4) over the padded 80 x 96 batch.
    assert masks.shape == (2, 2, num_dn + 10, 20, 24)
    assert outputs.enc_extras["mask_logits"].shape == (2, 10, 20, 24)
    for suffix in ("", "_0", "_enc", "_dn", "_dn_0"):
        assert losses["loss_mask" + suffix] > 0 and losses["loss_dice" + suffix] > 0
    sum(losses.values()).backward()
    head = model.heads["masks"]
    for part in (head.mask_embed.layers[0], head.pixel_decoder.lateral, head.pixel_decoder.output):
        assert part.weight.grad.abs().sum() > 0
    # The res2 stage feeds the masks only: it is trained through them.
    assert model.backbone.bottom_up.res2[0].conv1.weight.grad.abs().sum() > 0
    # One decoder_norm, before the class head too; content from the proposals, not learned.
    decoder = model.transformer.decoder
    assert head.norm is decoder.norm
    expected = decoder.class_embed[-1](decoder.norm(outputs.hidden_states[-1]))
    torch.testing.assert_close(outputs.pred_logits[-1], expected)
    tgt_embed = model.transformer.query_selection.tgt_embed.weight
    assert not tgt_embed.requires_grad and tgt_embed.grad is None


def test_training_lowers_the_loss_and_inference_gives_masks(
    tiny_mask_dino_config, rectangles_batch
):
    torch.manual_seed(0)
    cfg = tiny_mask_dino_config()
    model = instantiate(cfg.model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = rectangles_batch()
    totals = []
    for step in range(3):
        torch.manual_seed(step)
        losses = model(batch)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
    torch.manual_seed(0)
    with torch.no_grad():
        final = sum(model(batch).values()).item()
    assert final < totals[0]
    model.eval()
    with torch.no_grad():
        results = model([{"image": b["image"], "height": 32, "width": 48} for b in batch[:1]])
        raw = model.inference([{"image": batch[1]["image"]}], do_postprocess=False)
    instances = results[0]["instances"]
    assert instances.pred_masks.shape == (len(instances), 32, 48)
    assert instances.pred_masks.dtype == torch.bool
    assert not instances.has("mask_logits")
    assert ((instances.scores >= 0) & (instances.scores <= 1)).all()
    assert raw[0].pred_masks.shape == (len(raw[0]), 80, 72)


def test_mask_enhanced_anchors_share_the_mask_features(tiny_mask_dino_config, rectangles_batch):
    batch = rectangles_batch()
    references = {}
    for init in (None, "mask2box"):
        cfg = tiny_mask_dino_config()
        cfg.model.mask_box_init = init
        torch.manual_seed(0)
        model = instantiate(cfg.model).train()
        calls = []
        model.heads["masks"].pixel_decoder.register_forward_hook(lambda *args: calls.append(1))
        captured = {}
        model.criterion.register_forward_hook(lambda m, a, out: captured.update(outputs=a[0]))
        torch.manual_seed(0)
        model(batch)
        assert len(calls) == 1
        outputs = captured["outputs"]
        references[init] = outputs.reference_boxes[0, :, outputs.num_dn :]
        if init is not None:
            # The anchors are the boxes of the proposals' masks, inside the image.
            assert not torch.equal(references[init], references[None])
            assert ((references[init] >= 0) & (references[init] <= 1)).all()
