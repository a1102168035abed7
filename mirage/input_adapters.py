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


def resample_pos_embed(pos_embed, grid_size):
    """Resample a (1, D, h, w) position embedding to ``grid_size`` (bicubic, as pretrained
    MIRAGE/MultiMAE models are fine-tuned: ``align_corners=False``, no antialiasing)."""
    if tuple(pos_embed.shape[-2:]) == tuple(grid_size):
        return pos_embed
    return F.interpolate(pos_embed.float(), size=tuple(grid_size), mode="bicubic",
                         align_corners=False).to(pos_embed.dtype)


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
