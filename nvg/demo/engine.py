"""The demo's model side: requests checked into jobs, one worker thread that runs them in order, job status for polling.

Model calls are serialized (one worker: torch on a small CPU gains nothing from running two batches at once) while
requests stay isolated: every job has its own id, its own inputs and seed (a fresh torch.Generator per call), and
its own result. Requests are checked before they are queued, so a bad one is refused at once with a message.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import queue
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..sample import control
from ..sample.pictures import structure_image
from ..sample.sampler import STRUCTURE_SOLVERS, SampleConfig, Sampler
from . import uploads

MODES = ("none", "mask", "transfer", "regenerate")
MAX_SAMPLES = 16
MAX_QUEUED = 8
KEEP_JOBS = 64


class ProgressSampler(Sampler):
    """A Sampler that reports the stage it is at (content and structure passes) to `self.on_stage`."""

    on_stage = None

    def content_stage(self, canvas_BNC, labels_BN, y_B, stage, scale, use_cfg):
        if self.on_stage:
            self.on_stage(stage, "content")
        return super().content_stage(canvas_BNC, labels_BN, y_B, stage, scale, use_cfg)

    def structure_stage(self, canvas_next_BNC, labels_BN, content_ids, y_B, eps_BNK, stage, *args, **kw):
        if self.on_stage:
            self.on_stage(stage, "structure")
        return super().structure_stage(canvas_next_BNC, labels_BN, content_ids, y_B, eps_BNK, stage, *args, **kw)


@dataclass
class Request:
    cls: int
    mode: str = "none"
    seed: int = 0
    n: int = 4
    stages: int = 3  # transfer: stages of the reference's structure to take
    keep_stages: int = 3  # regenerate: stages < keep_stages are kept
    keep_content: bool = True  # regenerate: keep content and structure (False: the structure only)
    sampler: SampleConfig = field(default_factory=SampleConfig)
    mask: torch.Tensor | None = None  # (H, W) luminance
    image: torch.Tensor | None = None  # (3, size, size) in [-1, 1]
    notes: list[str] = field(default_factory=list)


def _int(body: dict, key: str, default: int, lo: int, hi: int, label: str) -> int:
    v = body.get(key, default)
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{label} must be a whole number in [{lo}, {hi}], got {v!r}")
    return v


def _sampler_config(raw: object) -> SampleConfig:
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ValueError("sampler settings must be an object")
    defaults = dataclasses.asdict(SampleConfig().resolved(None))  # the value types (every setting set)
    unknown = set(raw) - set(defaults)
    if unknown:
        raise ValueError(f"unknown sampler setting(s): {', '.join(sorted(unknown))}")
    kw = {}
    for name, value in raw.items():
        d = defaults[name]
        try:
            if isinstance(d, bool) or isinstance(d, str):
                if type(value) is not type(d):
                    raise TypeError
                kw[name] = value
            elif isinstance(d, tuple):
                if not isinstance(value, (list, tuple)) or len(value) != 2:
                    raise TypeError
                kw[name] = tuple(float(x) for x in value)
            elif isinstance(d, int):
                if isinstance(value, bool) or float(value) != int(float(value)):
                    raise TypeError
                kw[name] = int(float(value))
            else:
                kw[name] = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"sampler setting {name}: bad value {value!r}") from None
    numbers = [float(x) for v in kw.values() if not isinstance(v, str) for x in (v if isinstance(v, tuple) else (v,))]
    if not all(math.isfinite(x) and abs(x) < 1e6 for x in numbers):
        raise ValueError("sampler settings must be finite numbers")
    if kw.get("structure_steps", 1) > 1000:
        raise ValueError("structure_steps must be at most 1000")
    return SampleConfig(**kw)  # its own checks (temperature > 0, top-p in (0, 1], ...)


class Engine:
    """Holds the generator + tokenizer; `submit(body)` -> job id; `status(job_id)` -> the job's state as JSON."""

    def __init__(self, model, tokenizer, config: dict | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.sampler = ProgressSampler(model, tokenizer)
        cfg = model.config
        self.num_stages, self.num_classes, self.latent_hw = cfg.num_stages, cfg.num_classes, tuple(cfg.latent_hw)
        self.image_size = tokenizer.config.image_size
        names = (config or {}).get("class_names") or []
        self.class_names = [names[i] if i < len(names) else str(i) for i in range(self.num_classes)]
        self.device = next(model.parameters()).device
        self._jobs: OrderedDict[str, dict] = OrderedDict()
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[str, Request]] = queue.Queue()
        self._order = itertools.count()
        self._worker = threading.Thread(target=self._work, name="nvg-demo-worker", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------------------------------------ requests
    def info(self) -> dict:
        return {"classes": self.class_names, "num_stages": self.num_stages, "image_size": self.image_size,
                "latent_hw": list(self.latent_hw),
                "defaults": dataclasses.asdict(SampleConfig().resolved(self.model.config)),
                "solvers": list(STRUCTURE_SOLVERS), "max_samples": MAX_SAMPLES, "max_bytes": uploads.MAX_BYTES,
                "max_side": uploads.MAX_SIDE}

    def parse(self, body: object) -> Request:
        """Check a request (the page's JSON) and decode its uploads; ValueError with the page's message if bad."""
        if not isinstance(body, dict):
            raise ValueError("the request must be a JSON object")
        S = self.num_stages
        mode = body.get("mode", "none")
        if mode not in MODES:
            raise ValueError(f"unknown structure source {mode!r}: one of {', '.join(MODES)}")
        n = _int(body, "n", 4, 1, MAX_SAMPLES, "number of samples")
        r = Request(cls=_int(body, "class", 0, 0, self.num_classes - 1, "class"), mode=mode,
                    seed=_int(body, "seed", 0, 0, 2**63 - 1, "seed"), n=n,
                    sampler=_sampler_config(body.get("sampler")))
        if mode == "mask":
            r.mask = uploads.read_mask(body.get("mask"))
        elif mode in ("transfer", "regenerate"):
            if not body.get("image"):
                raise ValueError("reference image: upload an image first")
            rgb, r.notes = uploads.read_upload(body.get("image"), "reference image")
            r.image, more = uploads.to_model_input(rgb, self.image_size, "reference image")
            r.notes += more
            if mode == "transfer":
                r.stages = _int(body, "stages", 3, 1, S, "stages to take")
            else:
                r.keep_stages = _int(body, "keep_stages", 3, 1, S - 1, "stages to keep")
                keep = body.get("keep_content", True)
                if not isinstance(keep, bool):
                    raise ValueError("keep_content must be true or false")
                r.keep_content = keep
        return r

    def submit(self, body: object) -> str:
        req = self.parse(body)
        with self._lock:
            if self._queue.qsize() >= MAX_QUEUED:
                raise OverflowError(f"{MAX_QUEUED} requests are already waiting; try again shortly")
            job_id = secrets.token_hex(8)
            self._jobs[job_id] = {"id": job_id, "state": "queued", "order": next(self._order), "done": 0,
                                  "total": self.num_stages + 1, "text": "waiting", "notes": list(req.notes)}
            while len(self._jobs) > KEEP_JOBS:
                oldest = next(iter(self._jobs))
                if self._jobs[oldest]["state"] in ("queued", "running"):
                    break
                self._jobs.popitem(last=False)
            self._queue.put((job_id, req))
        return job_id

    def status(self, job_id: str) -> dict | None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            out = {k: v for k, v in job.items() if k != "order"}
            if job["state"] == "queued":
                ahead = sum(j["state"] in ("queued", "running") and j["order"] < job["order"]
                            for j in self._jobs.values())
                out["text"] = f"waiting for {ahead} request(s) ahead" if ahead else "starting"
            return out

    def _update(self, job_id: str, **kw) -> None:
        with self._lock:
            self._jobs[job_id].update(kw)

    # ------------------------------------------------------------------------------------------------ the worker
    def _work(self) -> None:
        while True:
            job_id, req = self._queue.get()
            self._update(job_id, state="running", text="starting", started=time.time())
            try:
                result = self.run(req, lambda i, what: self._update(
                    job_id, done=i, text=f"stage {i + 1} of {self.num_stages}: {what}"))
                self._update(job_id, state="done", done=self.num_stages + 1, text="done", **result)
            except Exception as e:  # a request that fails must not stop the worker
                self._update(job_id, state="error", error=f"{type(e).__name__}: {e}" if not isinstance(
                    e, ValueError) else str(e), text="failed")

    @torch.no_grad()
    def run(self, req: Request, on_stage=None) -> dict:
        """Run one request -> {"images", "labels" (n, S, N), "structures" (stage-1 maps), "progression" (per sample,
        per stage: the image after the stage and its structure map), "seconds"}; pictures as PNG data URLs."""
        t0 = time.time()
        y = torch.full((req.n,), req.cls, dtype=torch.long, device=self.device)
        self.sampler.on_stage = on_stage
        try:
            if req.mode == "mask":
                maps = control.mask_to_structure(req.mask, self.latent_hw).to(self.device)
                vgs = control.structure_guided(self.sampler, y, maps, req.sampler, req.seed)
            elif req.mode == "transfer":
                refs = req.image[None].expand(req.n, -1, -1, -1).to(self.device)
                vgs = control.structure_transfer(self.sampler, refs, y, req.stages, req.sampler, req.seed)
            elif req.mode == "regenerate":
                refs = req.image[None].expand(req.n, -1, -1, -1).to(self.device)
                vgs = control.regenerate(self.sampler, refs, req.keep_stages, y, not req.keep_content, req.sampler,
                                         req.seed)
            else:
                vgs = self.sampler.generate(y, req.sampler, seed=req.seed)
        finally:
            self.sampler.on_stage = None
        if on_stage:
            on_stage(self.num_stages, "decoding")
        images = self.tokenizer.decode(vgs.f_hat.float()).float().cpu()
        steps = [s.float().cpu() for s in self.tokenizer.decode_stages(vgs)]  # per stage (B, 3, H, W)
        size = images.shape[-1]
        maps = [structure_image(vgs.labels[:, i], i, self.latent_hw, size).cpu() for i in range(self.num_stages)]
        prog = [[{"stage": i, "image": uploads.png_data_url(steps[i][b]), "structure": uploads.png_data_url(maps[i][b])}
                 for i in range(self.num_stages)] for b in range(req.n)]
        return {"images": [uploads.png_data_url(im) for im in images], "labels": vgs.labels.cpu().tolist(),
                "structures": [p[1]["structure"] if len(p) > 1 else p[0]["structure"] for p in prog],
                "progression": prog, "seconds": round(time.time() - t0, 2)}
