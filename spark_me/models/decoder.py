"""SparK's light UNet-style decoder: five x2 upsampling blocks from stride 32 to full resolution."""

from __future__ import annotations

import math

from torch import Tensor, nn


class UpBlock(nn.Module):
    """ConvTranspose x2 -> (Conv3x3, BN, ReLU6) -> Conv3x3 -> BN."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin, kernel_size=4, stride=2, padding=1, bias=True)
        self.conv = nn.Sequential(
            nn.Conv2d(cin, cin, 3, padding=1, bias=False),
            nn.BatchNorm2d(cin),
            nn.ReLU6(inplace=True),
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.up(x))


class LightDecoder(nn.Module):
    """Widths halve at each block: width, width/2, ..., width/32, then a 1x1 conv to RGB.

    forward(to_dec) takes the densified encoder maps from stride 32 to stride 4 (channels width,
    width/2, width/4, width/8), adds each to the running map before the block at its scale.
    """

    def __init__(self, width: int = 768, up_ratio: int = 32, out_chans: int = 3):
        super().__init__()
        n = round(math.log2(up_ratio))
        if 2**n != up_ratio or width % up_ratio:
            raise ValueError(
                f"decoder width {width} must be divisible by the up ratio {up_ratio} (power of 2)"
            )
        self.widths = [width // 2**i for i in range(n + 1)]
        self.dec = nn.ModuleList(
            UpBlock(cin, cout) for cin, cout in zip(self.widths[:-1], self.widths[1:], strict=True)
        )
        self.proj = nn.Conv2d(self.widths[-1], out_chans, kernel_size=1, bias=True)
        self.apply(init_weights)

    def forward(self, to_dec: list[Tensor]) -> Tensor:
        """to_dec: [B, width/2^i, H/32*2^i, W/32*2^i] for i = 0..3 -> [B, 3, H, W]."""
        x = 0
        for i, block in enumerate(self.dec):
            if i < len(to_dec):
                x = x + to_dec[i]
            x = block(x)
        return self.proj(x)


def init_weights(m: nn.Module) -> None:
    """The official SparK decoder init, rule by rule (its if/elif chain, written out here).

    Conv2d and Linear: trunc-normal(std .02) weights, zero bias. ConvTranspose2d is not a Conv2d
    subclass, so the official chain gives the up-sampling convs kaiming-normal (fan_out, relu) and a
    zero bias instead: std sqrt(2 / (16 * cin)), ~.013 at width 768. Norms: weight 1, bias 0.
    Matching these keeps a spark-me run numerically comparable with the official code.
    """
    if isinstance(m, nn.ConvTranspose2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d | nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d | nn.SyncBatchNorm | nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
