"""The README's "Align the file you deploy" example: a user's model and export script.

    python mynet.py                                             # writes net.onnx
    fxalign align mynet.py:make -i 1x3x32x32 --onnx net.onnx    # blames blocks.1.act

``demo::relu6`` is a custom op whose ONNX translation (``relu6_onnx``) forgets the upper clamp.
"""

import torch
from torch import nn


@torch.library.custom_op("demo::relu6", mutates_args=())
def relu6(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0, 6)


relu6.register_fake(lambda x: torch.empty_like(x))


class Clip6(nn.Module):
    def forward(self, x):
        return relu6(x)


class Block(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), act

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(Block(nn.Hardswish()), Block(Clip6()))
        self.pool, self.head = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.pool(self.blocks(self.stem(x))).flatten(1))


def make() -> Net:
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.blocks[1].bn.running_var.fill_(1e-4)  # activations above 6 in blocks.1
    return net


if __name__ == "__main__":
    from onnxscript import opset18 as op

    def relu6_onnx(x):  # the translation forgets the upper clamp
        return op.Relu(x)

    x = torch.randn(1, 3, 32, 32) * 4
    table = {torch.ops.demo.relu6.default: relu6_onnx}
    torch.onnx.export(make(), (x,), "net.onnx", dynamo=True, custom_translation_table=table)
