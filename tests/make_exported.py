"""Build the small exported test models in tests/data/ with torch (a test-data recipe;
torch is not needed to run the tests). Run: python tests/make_exported.py

- tiny_encoder.onnx: embedding + one transformer encoder layer (attention, LayerNorm,
  GELU-Erf, FFN), opset 14, so LayerNorm is exported as ReduceMean/Sub/Pow/Sqrt/Div
  and GELU as Div/Erf/Add/Mul/Mul; dynamic batch and sequence.
- tiny_resnet.onnx: Conv-BN-ReLU6 stem, depthwise + pointwise convs, a residual Add,
  a SiLU (Sigmoid*x) and a GELU-tanh branch, GlobalAveragePool, Linear; opset 13,
  exported in training=TRAINING mode for BatchNorm to stay in the graph.
"""

from pathlib import Path

import torch
from torch import nn

OUT = Path(__file__).resolve().parent / "data"


class Encoder(nn.Module):
    def __init__(self, vocab=50, dim=32, heads=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(16, dim)
        self.ln0 = nn.LayerNorm(dim)
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln1 = nn.LayerNorm(dim)
        self.ff1 = nn.Linear(dim, 4 * dim)
        self.ff2 = nn.Linear(4 * dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.act = nn.GELU()

    def forward(self, ids):
        b, s = ids.shape
        pos = torch.arange(s, device=ids.device).unsqueeze(0)
        x = self.ln0(self.emb(ids) + self.pos(pos))
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        d = q.shape[-1] // self.heads
        q, k, v = (t.reshape(b, s, self.heads, d).transpose(1, 2) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, s, -1)
        x = self.ln1(x + self.proj(y))
        return self.ln2(x + self.ff2(self.act(self.ff1(x))))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 16, 1)
        self.relu = nn.ReLU()
        self.pad = nn.ZeroPad2d(1)
        self.conv3 = nn.Conv2d(16, 16, 3)
        self.silu = nn.SiLU()
        self.conv4 = nn.Conv2d(16, 16, 1)
        self.gelu = nn.GELU(approximate="tanh")
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.pw(self.relu(self.dw(x)))
        a = self.silu(self.conv3(self.pad(x)))
        b = self.gelu(self.conv4(x))
        y = torch.cat([a, b], dim=1).mean(dim=(2, 3))
        return self.head(y)


def main():
    torch.manual_seed(0)
    OUT.mkdir(exist_ok=True)
    enc = Encoder().eval()
    torch.onnx.export(enc, (torch.randint(0, 50, (2, 8)),), OUT / "tiny_encoder.onnx", opset_version=14,
                      input_names=["ids"], output_names=["hidden"], dynamo=False,
                      dynamic_axes={"ids": {0: "batch", 1: "seq"}, "hidden": {0: "batch", 1: "seq"}})
    net = TinyResNet()
    with torch.no_grad():  # give BatchNorm non-trivial statistics
        net.stem[1].running_mean.uniform_(-0.5, 0.5)
        net.stem[1].running_var.uniform_(0.5, 2.0)
    net.eval()
    torch.onnx.export(net, (torch.randn(1, 3, 16, 16),), OUT / "tiny_resnet.onnx", opset_version=13,
                      input_names=["x"], output_names=["logits"], dynamo=False, do_constant_folding=False,
                      training=torch.onnx.TrainingMode.PRESERVE,
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    for f in sorted(OUT.glob("*.onnx")):
        print(f.name, f.stat().st_size)


if __name__ == "__main__":
    main()
