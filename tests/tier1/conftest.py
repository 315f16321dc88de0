"""Tier-1 fixtures shared by the training tests."""
import pytest
import torch

# A two-level SD-topology diffusers UNet (cross-attention on the outer level), small enough to train in seconds.
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)


@pytest.fixture(scope="session")
def tiny_unet():
    """``tiny_unet(seed=0, **overrides)``: a fresh :data:`TINY_UNET` (``UNet2DConditionModel``) with weights drawn
    from ``seed``."""
    from diffusers import UNet2DConditionModel

    def make(seed=0, **overrides):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**{**TINY_UNET, **overrides})
    return make
