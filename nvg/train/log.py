"""A run's scalars: a JSON-lines log in the run directory (`log.jsonl`, one object per logging step), TensorBoard
events beside it when the `tensorboard` package is installed, and a loss-curve picture drawn at the end of a run."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .. import checkpoint


class RunLog:
    """Appends {"step", "seconds", <scalars>} lines; on resume, lines past the resumed step are dropped first."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, resume_step: int = 0):
        self.path, self.enabled, self.tb = Path(run_dir) / "log.jsonl", enabled, None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_log(self.path) if r.get("step", 0) <= resume_step] if resume_step else []
        checkpoint.atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            SummaryWriter = None
        if SummaryWriter is not None:
            self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step or None)

    def write(self, step: int, scalars: dict[str, float], seconds: float) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "seconds": round(seconds, 3), **scalars}) + "\n")
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

    def plot(self, out: str | Path, keys: tuple[str, ...] = ("loss",)) -> Path | None:
        """loss.png: the curve(s) of `keys` against the step; None when there is nothing to draw."""
        return plot_curves(read_log(self.path), out, keys) if self.enabled else None


def read_log(path: str | Path) -> list[dict]:
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:  # a line cut by a kill
                    continue
    return rows


def plot_curves(rows: list[dict], out: str | Path, keys: tuple[str, ...] = ("loss",), size=(640, 360)) -> Path | None:
    """A plain line chart (PIL only): one colour per key, the step on x, the value on y, with min / max labels."""
    from PIL import Image, ImageDraw

    series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
              for k in keys}
    series = {k: v for k, v in series.items() if len(v) >= 2}
    if not series:
        return None
    W, H, pad = size[0], size[1], 40
    xs = [s for v in series.values() for s, _ in v]
    ys = [y for v in series.values() for _, y in v]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-9)
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([pad, pad // 2, W - pad // 2, H - pad], outline=(160, 160, 160))
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
    for i, (k, pts) in enumerate(series.items()):
        xy = [(pad + (s - x0) / (x1 - x0) * (W - 1.5 * pad), H - pad - (y - y0) / (y1 - y0) * (H - 1.5 * pad))
              for s, y in pts]
        draw.line(xy, fill=colours[i % len(colours)], width=2)
        draw.text((pad + 5 + 90 * i, 4), k, fill=colours[i % len(colours)])
    draw.text((2, pad // 2), f"{y1:.3g}", fill="black")
    draw.text((2, H - pad - 10), f"{y0:.3g}", fill="black")
    draw.text((pad, H - pad + 5), f"step {x0}", fill="black")
    draw.text((W - pad - 60, H - pad + 5), f"step {x1}", fill="black")
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}.png")
    img.save(tmp)
    os.replace(tmp, out)
    return out
