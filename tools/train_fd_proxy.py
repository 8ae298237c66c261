"""Train the FD-proxy CNN (nvg/fd_proxy.py) on the embedded Fashion-MNIST train split and save its weights.

    python tools/train_fd_proxy.py            # about 5 min on one CPU core; writes nvg/assets/fd_proxy_cnn.safetensors

Recipe (fixed; changing it changes every FD-proxy number): seed 0, one thread, the 8000 train images at 32x32,
batch 128, AdamW (lr 3e-3, weight decay 5e-4) with a cosine schedule over EPOCHS epochs, augmentation by random
horizontal flip and a random shift of up to 2 pixels (zero fill). Accuracy is measured on the 2000 val images.
The weights are stored as float16 and computed in float32.
"""
import argparse
import json
import math
import os
import tempfile
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from nvg.data import load_dataset
from nvg.eval.fd_proxy import WEIGHTS_PATH, ProxyCNN

EPOCHS, BATCH, LR, WEIGHT_DECAY, SEED, SHIFT = 15, 128, 3e-3, 5e-4, 0, 2


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random integer shift in [-SHIFT, SHIFT]^2 per image."""
    flip = torch.rand(x.shape[0], generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (SHIFT,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * SHIFT + 1, (2, x.shape[0]), generator=g).tolist()
    h, w = x.shape[-2:]
    return torch.stack([padded[i, :, a : a + h, b : b + w] for i, (a, b) in enumerate(zip(dy, dx, strict=True))])


@torch.no_grad()
def accuracy(model: ProxyCNN, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    pred = torch.cat([model(x[i : i + 500]).argmax(1) for i in range(0, len(x), 500)])
    return float((pred == y).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=WEIGHTS_PATH)
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.manual_seed(SEED)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(SEED)
    train, val = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "val")
    xt, yt = train.images.float() / 127.5 - 1, train.labels  # gray [N,1,32,32]: the CNN averages channels anyway
    xv, yv = val.images.float() / 127.5 - 1, val.labels
    model = ProxyCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    steps = args.epochs * math.ceil(len(xt) / BATCH)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), BATCH):
            idx = perm[i : i + BATCH]
            loss = F.cross_entropy(model(augment(xt[idx], g)), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}/{args.epochs} loss {loss.item():.3f} val acc {accuracy(model, xv, yv):.4f} "
              f"({time.time() - t0:.0f} s)", flush=True)
    # Stored as float16 (0.56 MB instead of 1.1 MB); the accuracies below are those of the rounded weights.
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    val_acc = accuracy(model, xv, yv)
    meta = {"val_accuracy": f"{val_acc:.4f}", "train_accuracy": f"{accuracy(model, xt, yt):.4f}",
            "recipe": json.dumps({"epochs": args.epochs, "batch": BATCH, "lr": LR, "weight_decay": WEIGHT_DECAY,
                                  "seed": SEED, "shift": SHIFT, "flip": True, "data": "fashion-mnist train 8000"})}
    out = os.path.abspath(args.out)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(out), suffix=".safetensors")
    os.close(fd)
    save_file(state, tmp, metadata=meta)
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
    print(f"wrote {out} ({os.path.getsize(out) / 1e6:.2f} MB): {meta}")


if __name__ == "__main__":
    main()
