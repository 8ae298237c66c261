"""Training: one loop (`loop.py`) for the four trainers (NVG tokenizer and generator here, the VAR tokenizer and
transformer in nvg.baselines.var), shared machinery (`common.py`: distributed set-up, EMA, LR schedules, resumable
batches, image grids), training-only losses (discriminators, LPIPS, the REPA encoder) and FSDP helpers.

The command line is `python -m nvg.train` (nvg/train/__main__.py); without arguments it runs the main job.
"""
