"""The input adapter: patchifier + projector and the fixed 2-D sin-cos position embedding."""
import torch
import torch.nn.functional as F
from torch import nn


def sincos_pos_embed_2d(embed_dim, grid_size, temperature=10000.0):
    """Fixed 2-D sine-cosine position embedding, (1, D, gh, gw).

    A quarter of the channels each hold sin/cos of the column index and sin/cos of the
    row index at geometrically spaced frequencies (the MAE/MultiMAE construction).
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim {embed_dim} must be divisible by 4")
    gh, gw = grid_size
    rows, cols = torch.meshgrid(torch.arange(gh, dtype=torch.float32),
                                torch.arange(gw, dtype=torch.float32), indexing="ij")
    quarter = embed_dim // 4
    freqs = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    angle_c = cols.reshape(-1, 1) * freqs  # (N, D/4)
    angle_r = rows.reshape(-1, 1) * freqs
    emb = torch.cat([angle_c.sin(), angle_c.cos(), angle_r.sin(), angle_r.cos()], dim=1)
    return emb.T.reshape(1, embed_dim, gh, gw)


# How each family resamples its position embedding to another grid (its authors' code):
POS_EMBED_RULES = {
    # MAE / RETFound (util/pos_embed.interpolate_pos_embed), RETFound-DINOv2 (the same
    # function on the teacher), VisionFM (utils.resize_pos_embed), MIRAGE / MultiMAE
    "bicubic": "bicubic to the new size, align_corners=False, no antialiasing",
    # DINOv2 without registers (interpolate_offset=0.1, interpolate_antialias=False)
    "bicubic_offset": "bicubic by scale factor (new + 0.1) / old, align_corners=False",
    # DINOv2 _reg models (interpolate_offset=0, interpolate_antialias=True); SAM and MedSAM
    # as timm runs them (SAM's own code only runs at 1024)
    "bicubic_antialias": "antialiased bicubic to the new size",
}


def resample_pos_embed(pos_embed, grid_size, rule="bicubic"):
    """Resample a (1, D, h, w) position embedding to ``grid_size`` = (gh, gw) by ``rule``
    (a key of :data:`POS_EMBED_RULES`); the same grid is returned unchanged, as every
    family's own code does. Computed in float32 (DINOv2 upcasts too), returned in the
    input dtype.

    ``bicubic_offset`` is DINOv2's historical rule: the scale factor (g + 0.1) / h, not the
    size, sets the sampling positions (source = (i + 0.5) / scale - 0.5), so even a grid
    that keeps one side is resampled along it.
    """
    grid_size = (int(grid_size[0]), int(grid_size[1]))
    if tuple(pos_embed.shape[-2:]) == grid_size:
        return pos_embed
    x = pos_embed.float()
    if rule == "bicubic":
        out = F.interpolate(x, size=grid_size, mode="bicubic", align_corners=False)
    elif rule == "bicubic_antialias":
        out = F.interpolate(x, size=grid_size, mode="bicubic", align_corners=False,
                            antialias=True)
    elif rule == "bicubic_offset":
        h, w = pos_embed.shape[-2:]
        scale = ((grid_size[0] + 0.1) / h, (grid_size[1] + 0.1) / w)
        out = F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False)
        if tuple(out.shape[-2:]) != grid_size:  # DINOv2 asserts this too
            raise RuntimeError(f"offset resampling of a {h}x{w} grid gave "
                               f"{tuple(out.shape[-2:])}, not {grid_size}")
    else:
        raise ValueError(f"unknown position-embedding rule {rule!r}; one of "
                         f"{', '.join(POS_EMBED_RULES)}")
    return out.to(pos_embed.dtype)


class PatchedInputAdapter(nn.Module):
    """Image (B, C, H, W) -> patch tokens (B, N, D), N = (H / ph) * (W / pw), row-major.

    Each token is a linear projection of its patch (a conv with kernel = stride = patch
    size) plus the position embedding of its grid cell.
    """

    def __init__(self, image_size, patch_size, embed_dim, in_chans=1,
                 learnable_pos_emb=False):
        super().__init__()
        self.image_size = tuple(image_size)
        self.patch_size = tuple(patch_size)
        self.grid_size = (self.image_size[0] // self.patch_size[0],
                          self.image_size[1] // self.patch_size[1])
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size,
                              stride=self.patch_size)
        self.pos_emb = nn.Parameter(sincos_pos_embed_2d(embed_dim, self.grid_size),
                                    requires_grad=learnable_pos_emb)

    def forward(self, x):
        if tuple(x.shape[-2:]) != self.image_size or x.shape[1] != self.in_chans:
            raise ValueError(f"expected images of shape (B, {self.in_chans}, "
                             f"{self.image_size[0]}, {self.image_size[1]}), got "
                             f"{tuple(x.shape)}; build the model with this input_size")
        x = self.proj(x) + self.pos_emb
        return x.flatten(2).transpose(1, 2)
