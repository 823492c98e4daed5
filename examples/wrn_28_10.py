"""Split a hand-built CIFAR WRN-28-10 (not a timm model) and compare with the SplitNet paper's figures.

    python examples/wrn_28_10.py

The paper (Divide and Co-training, T-IP 2022, Table: CIFAR-100) reports WRN-28-10 at 36.5M params / 5.25 GFLOPs,
its hand-made S=2 split at 35.8M / 5.16G and S=4 at 36.7M / 5.28G. timm_split calibrates the widths instead.
"""
import torch
from torch import nn

import timm_split
from timm_split.count import count


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.short = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        o = torch.relu(self.bn1(x))
        y = self.conv2(torch.relu(self.bn2(self.conv1(o))))
        return y + (x if self.short is None else self.short(o))


class WideResNet(nn.Module):
    """WRN-depth-k for 32x32 inputs (Zagoruyko & Komodakis), pre-activation blocks."""

    def __init__(self, depth: int = 28, k: int = 10, num_classes: int = 100):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * k, 32 * k, 64 * k]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths[1:]):
            for j in range(n):
                blocks.append(_Block(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.bn, self.fc = nn.BatchNorm2d(cin), nn.Linear(cin, num_classes)
        self.num_classes = num_classes

    def forward(self, x):
        x = torch.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def main() -> None:
    paper = {1: (36.5, 5.25), 2: (35.8, 5.16), 4: (36.7, 5.28)}
    with torch.device("meta"):
        model = WideResNet()
    base = count(model, 32)
    print(f"{'S':>2} {'params (M)':>11} {'paper':>7} {'GFLOPs':>8} {'paper':>7} {'params ratio':>13} "
          f"{'FLOPs ratio':>12}")
    for S in (1, 2, 4):
        ens = timm_split.split(model, S, img_size=32)
        c = count(ens.members[0], 32)
        p, g = S * c.params / 1e6, S * c.gmacs
        print(f"{S:>2} {p:>11.2f} {paper[S][0]:>7.1f} {g:>8.3f} {paper[S][1]:>7.2f} "
              f"{p * 1e6 / base.params:>13.4f} {g / base.gmacs:>12.4f}")
    print("(GFLOPs here are fvcore multiply-accumulates, the convention of the paper's table)")


if __name__ == "__main__":
    main()
