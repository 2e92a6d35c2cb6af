import torch

from mumu_core.encoder import MumuConditioning
from mumu_core.pipeline import cross_attention_mask, load_sdxl_pipeline, pad_to


def test_padded_masked_context_equals_unpadded(tiny):
    """CFG pads positive/negative to one length; the mask makes padding invisible to the UNet."""
    pipe = load_sdxl_pipeline(tiny["sdxl"])
    unet = pipe.unet
    torch.manual_seed(0)
    short = MumuConditioning(torch.randn(1, 5, 2048), torch.randn(1, 1280), torch.ones(1, 5, dtype=torch.bool))
    ctx, mask = pad_to(short, 12)
    assert ctx.shape == (1, 12, 2048) and mask.sum() == 5
    x = torch.randn(1, 4, 16, 16)
    added = {"text_embeds": short.pooled, "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]], dtype=torch.float32)}
    with torch.no_grad():
        ref = unet(x, 10, encoder_hidden_states=short.context, added_cond_kwargs=added).sample
        naive = unet(x, 10, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        with cross_attention_mask(unet, mask, mask):
            masked = unet(x, 10, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
    torch.testing.assert_close(masked, ref, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(naive, ref, atol=1e-4)


def test_cfg_batch_gets_negative_then_positive_masks(tiny):
    pipe = load_sdxl_pipeline(tiny["sdxl"])
    seen = {}

    def spy(_m, args, kwargs):
        seen["mask"] = kwargs["encoder_attention_mask"]

    pos = torch.tensor([[True, True, True, False]])
    neg = torch.tensor([[True, False, False, False]])
    with cross_attention_mask(pipe.unet, pos, neg):
        h = pipe.unet.register_forward_pre_hook(spy, with_kwargs=True)
        x = torch.randn(2, 4, 8, 8)
        added = {"text_embeds": torch.zeros(2, 1280), "time_ids": torch.zeros(2, 6)}
        with torch.no_grad():
            pipe.unet(x, 10, encoder_hidden_states=torch.zeros(2, 4, 2048), added_cond_kwargs=added)
        h.remove()
    assert torch.equal(seen["mask"], torch.cat([neg, pos]))
