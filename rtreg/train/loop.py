"""The resumable training loop shared by ``rtreg train ...`` commands.

A run keeps ``<work>/checkpoint.pt`` (model, optimiser, scheduler, step, training time so far) every
``checkpoint_every`` steps and appends the mean losses since the last checkpoint, with the training time
(seconds, summed over resumed runs), to ``<work>/log.jsonl``. Each step's random draws
must be seeded by (seed, step) in ``step_losses``, so a run resumed from a checkpoint ends exactly where
an uninterrupted run ends.
"""
from __future__ import annotations

import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch


def cosine_schedule(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate falls from its initial value to a tenth of it along a cosine over ``steps``."""
    return torch.optim.lr_scheduler.LambdaLR(   # math.cos: plain floats, so the state loads with weights_only
        opt, lambda k: 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(k, steps) / steps)))


def last_logged(work: Path) -> Dict:
    """The last line of ``<work>/log.jsonl`` (the final mean losses), or {}."""
    history = Path(work) / "log.jsonl"
    return json.loads(history.read_text().strip().splitlines()[-1]) if history.exists() else {}


def training_command() -> str:
    """The running command line as the manifest records it (``rtreg train ...``)."""
    return "rtreg " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def export_weights(name: str, net: torch.nn.Module, config: Dict, work: Path, summary: Dict, command: str,
                   data: str, models_dir: Optional[Path], log: Callable[[str], None], **extra) -> Path:
    """Write a trained network's weights and their manifest entry (the command, the training ``summary``, the
    final logged losses of ``work``, the ``data`` and any ``extra`` fields); ``summary`` gains the path."""
    from ..models import save_weights
    record = {"command": command, "training": summary, "final_loss": last_logged(Path(work)), "data": data, **extra}
    path = save_weights(name, net.state_dict(), config, record, models_dir)
    summary["weights"] = str(path)
    log(f"weights written to {path}")
    return path


def resumable_training(work: Path, net: torch.nn.Module, opt: torch.optim.Optimizer,
                       sched: torch.optim.lr_scheduler.LRScheduler, steps: int,
                       step_losses: Callable[[int], Dict[str, torch.Tensor]], stop_at: Optional[int] = None,
                       checkpoint_every: int = 50, clip: float = 5.0, log: Callable[[str], None] = print) -> int:
    """Run steps (from the checkpoint's step, if any) up to ``steps`` or ``stop_at``; returns the last step done.

    ``step_losses(step)`` returns a dict of loss terms whose ``"total"`` is minimised."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "checkpoint.pt"
    start, earlier_s = 0, 0.0
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = int(state["step"])
        earlier_s = float(state.get("elapsed_s", 0.0))      # training time before this run (s)
        log(f"resumed at step {start}")
    recent: List[Dict[str, float]] = []
    t0 = time.perf_counter()
    net.train()
    last_step = steps if stop_at is None else min(steps, stop_at)
    for step in range(start, last_step):
        terms = step_losses(step)
        opt.zero_grad()
        terms["total"].backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()
        sched.step()
        recent.append({k: float(v.detach()) for k, v in terms.items()})
        if (step + 1) % checkpoint_every == 0 or step + 1 == last_step:
            mean = {k: float(np.mean([r[k] for r in recent])) for k in recent[0]}
            with open(work / "log.jsonl", "a") as fh:
                fh.write(json.dumps({"step": step + 1, **mean, "lr": sched.get_last_lr()[0],
                                     "elapsed_s": earlier_s + time.perf_counter() - t0}) + "\n")
            log(f"step {step + 1}/{steps}: " + ", ".join(f"{k} {v:.4f}" for k, v in mean.items()))
            recent = []
            torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "step": step + 1,
                        "elapsed_s": earlier_s + time.perf_counter() - t0}, ckpt)
    if last_step < steps:
        log(f"stopped at step {last_step} of {steps}; run the same command again to resume")
    return max(last_step, start)
