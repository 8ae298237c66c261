"""Offline evaluation: FD-proxy, FID, precision/recall and class accuracy of samples; reconstruction metrics of the
tokenizer. Nothing is downloaded.

    python -m nvg.eval --samples samples.npz [--reference fashion-mnist] [--fid] [--n 1000] [--classes 0 3]
    python -m nvg.eval tokenizer --ckpt runs/tokenizer [--dataset fashion-mnist] [--n 1000] [--fid]

Every number is printed with its sample count and its floor: the same metric between two sets of real images of
the same size (held-out real images against the reference), the value a perfect generator would get at that count.
Reference: a dataset name from nvg.data (its `train` split is the reference, its `val` split gives the floor) or a
folder / .npz of images (with train/ and val/ sub-folders, used the same way; otherwise a fixed random half of it
gives the floor and the other half is the reference). Features of named datasets are cached in --cache-dir.
"""
import argparse
import json
import os
import sys
import tempfile

import torch

from ..data import DATASET_NAMES, load_dataset
from .features import default_cache_dir
from .inception import INSTALL_HINT, inception_available
from .samples import evaluate_samples, format_rows, load_images



# ----------------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------------
def _write_json(path: str, obj) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".json.tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fid", action="store_true", help=f"also FID with Inception-v3 (needs `{INSTALL_HINT}`)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="also write the results to this JSON file")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["tokenizer"]:
        p = argparse.ArgumentParser(prog="python -m nvg.eval tokenizer", description="Evaluate a tokenizer checkpoint")
        p.add_argument("--ckpt", required=True, help="run directory (uses its latest checkpoint) or checkpoint dir")
        p.add_argument("--raw", action="store_true", help="use the raw weights (default: EMA when kept)")
        p.add_argument("--dataset", default="fashion-mnist")
        p.add_argument("--split", default="val")
        p.add_argument("--n", type=int, default=1000)
        _common(p)
        a = p.parse_args(argv[1:])
        if a.fid and not inception_available():
            p.error(f"--fid needs the Inception weights: {INSTALL_HINT}")
        from .tokenizer import evaluate_tokenizer, format_tokenizer, load_tokenizer_checkpoint

        try:
            tok = load_tokenizer_checkpoint(a.ckpt, a.raw, a.device)
            ds = load_dataset(a.dataset, a.split, tok.config.image_size)
            res = evaluate_tokenizer(tok, ds, a.n, a.batch_size, a.fid, a.device)
        except (ValueError, FileNotFoundError) as e:
            p.error(str(e))
        print(f"tokenizer {a.ckpt} on {a.dataset} {a.split}\n\n{format_tokenizer(res)}")
    else:
        p = argparse.ArgumentParser(prog="python -m nvg.eval", description="Evaluate generated images (FD-proxy, "
                                    "precision/recall, class accuracy, FID with --fid) against a reference set")
        p.add_argument("--samples", required=True, help=".npz (images [N,H,W,3] uint8, optional labels) or folder")
        p.add_argument("--reference", default="fashion-mnist", help=f"one of {DATASET_NAMES}, a folder or a .npz")
        p.add_argument("--n", type=int, help="use the first n samples (default: all)")
        p.add_argument("--ref-n", type=int, help="use the first ref-n reference images (default: all)")
        p.add_argument("--classes", type=int, nargs="+", help="keep only samples of these labels")
        p.add_argument("--k", type=int, default=3, help="k of the k-NN precision/recall manifolds")
        p.add_argument("--cache-dir", default=None, help=f"reference feature cache (default {default_cache_dir()})")
        _common(p)
        a = p.parse_args(argv)
        if a.fid and not inception_available():
            p.error(f"--fid needs the Inception weights: {INSTALL_HINT}")
        try:
            images, labels = load_images(a.samples)
            res = evaluate_samples(images, labels, a.reference, a.fid, a.n, a.classes, a.ref_n, a.cache_dir,
                                   a.batch_size, a.device, a.k)
        except (ValueError, FileNotFoundError) as e:
            p.error(str(e))
        print(f"samples {a.samples} against {a.reference}\n\n{format_rows(res)}")
    if a.json:
        _write_json(a.json, res)


if __name__ == "__main__":
    main()
