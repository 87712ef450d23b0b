"""``vqtriton demo``: train a small convolutional VQ-VAE on scikit-learn's digits.

The 1,797 8x8 digit images ship inside scikit-learn (no download). The encoder maps an image to a
4x4 grid of D-dim latents, the VectorQuantizer (channel-first) snaps each to one of K codes, the
decoder reconstructs the image. Training shows a progress bar; the end prints held-out
reconstruction error, perplexity and codebook usage and writes ``reconstructions.png`` and
``training.png``.

Every ``save_every`` steps and at the end, ``checkpoint.pt`` is written atomically
(:func:`vqtriton.checkpoint.save`) with everything the next step depends on: the model's weights and
buffers, Adam's state, the batch sampler's generator, torch's (and Python's and NumPy's) RNG states, the
step and the history. ``--resume`` restores all of it, so a run killed at any point and resumed ends
bitwise equal to the run that never stopped (on the CPU; on CUDA with ``--deterministic``). A damaged
checkpoint, or one another configuration wrote, stops the run with an error naming the file.

Test-only fault injection: ``VQTRITON_DEMO_FAULT=step:N:PHASE`` SIGKILLs the process during step ``N``
(0-based) after its ``forward``, ``backward`` or ``update`` (the optimizer step);
``VQTRITON_DEMO_FAULT=save:N:PHASE`` SIGKILLs it while writing the checkpoint of step ``N``: once the temp
file holds ``partial`` bytes, once it is ``written`` (complete, fsync-ed, not yet renamed), or once it is
``renamed`` (before the folder's fsync). ``tests/test_resume.py`` uses it to land kills exactly there.
"""

from __future__ import annotations

import math
import os
import random
import signal
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vqtriton import checkpoint, checks

CHECKPOINT = "checkpoint.pt"
SAVE_EVERY = 250
HISTORY_EVERY = 10  # the history records every 10th step and the last one
FAULT_ENV = "VQTRITON_DEMO_FAULT"  # test-only: see the module docstring
FAULT_PHASES = {"step": ("forward", "backward", "update"), "save": ("partial", "written", "renamed")}


@dataclass
class DemoConfig:
    steps: int = 1500
    codes: int = 64
    dim: int = 16
    batch: int = 128
    lr: float = 2e-3
    ema: bool = False
    device: str = "cpu"
    backend: str | None = None
    out: str = "vqtriton-demo"
    resume: bool = False
    seed: int = 0
    progress: bool = True
    save_every: int = SAVE_EVERY
    deterministic: bool = False


# The settings a resumed run must share with the run that wrote the checkpoint (all but the step count,
# the folder, how often it saves and whether it shows a progress bar).
RUN_SETTINGS = ("codes", "dim", "batch", "lr", "ema", "device", "backend", "seed", "deterministic")


def load_digits(device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Train / held-out split of the digits as float32 ``[B, 1, 8, 8]`` in [0, 1]."""
    from sklearn.datasets import load_digits as sk_digits

    images = torch.tensor(sk_digits().images, dtype=torch.float32).unsqueeze(1) / 16.0
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    held = len(images) // 5
    return images[order[held:]].to(device), images[order[:held]].to(device)


def build_model(cfg: DemoConfig):
    import vqtriton as vqt

    encoder = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, cfg.dim, 1),
    )  # fmt: skip
    decoder = nn.Sequential(
        nn.Conv2d(cfg.dim, 32, 3, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(32, 32, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 1, 3, padding=1), nn.Sigmoid(),
    )  # fmt: skip
    quantizer = vqt.VectorQuantizer(
        cfg.dim,
        cfg.codes,
        channel_dim=1,
        ema_decay=0.9 if cfg.ema else None,
        kmeans_init=True,
        dead_code_threshold=0.05 if cfg.ema else 0.0,
        backend=cfg.backend,
    )
    return vqt.VQVAE(encoder, quantizer, decoder).to(cfg.device)


def step_losses(model, x: torch.Tensor):
    """Mean reconstruction error per pixel and the quantizer's loss and metrics."""
    import vqtriton as vqt

    z_e = model.encode(x)
    z_q, _, vq_loss, info = model.quantizer(z_e, return_breakdown=True)
    recon = vqt.squared_error(model.decoder(z_q), x, reduction="mean")
    return recon, vq_loss, info


def evaluate(model, held: torch.Tensor) -> dict:
    model.eval()
    with torch.no_grad():
        recon, _, info = step_losses(model, held)
    model.train()
    return {"reconstruction": float(recon), "perplexity": float(info.perplexity), "usage": float(info.usage)}


def plot(model, held: torch.Tensor, history: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model.eval()
    with torch.no_grad():
        shown = held[:12]
        recon = model.decoder(model.quantizer(model.encode(shown))[0])
    model.train()
    fig, axes = plt.subplots(2, len(shown), figsize=(len(shown), 2.3))
    for j in range(len(shown)):
        for i, img in enumerate((shown[j], recon[j])):
            axes[i, j].imshow(img[0].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            axes[i, j].axis("off")
    axes[0, 0].set_title("held-out digits (top) and their VQ-VAE reconstructions (bottom)", loc="left", fontsize=8)
    fig.savefig(os.path.join(out, "reconstructions.png"), dpi=100, bbox_inches="tight")
    plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax1.plot(history["step"], history["reconstruction"], label="reconstruction")
    # The codebook and commitment terms have one value (they differ only in where gradients go).
    ax1.plot(history["step"], history["commitment"], label="codebook = commitment")
    ax1.set_yscale("log")
    ax1.set_xlabel("step")
    ax1.set_title("training losses (per element)")
    ax1.legend()
    ax2.plot(history["step"], history["perplexity"], color="tab:purple")
    ax2.set_xlabel("step")
    ax2.set_title("codebook perplexity")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "training.png"), dpi=100)
    plt.close(fig)


def _fault_plan() -> tuple[str, int, str] | None:
    """The test-only fault of ``VQTRITON_DEMO_FAULT`` (see the module docstring), or None."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return None
    parts = spec.split(":")
    known = len(parts) == 3 and parts[0] in FAULT_PHASES and parts[2] in FAULT_PHASES[parts[0]]
    if not (known and parts[1].isdigit()):
        options = "; ".join(f"{kind}:N:{'|'.join(phases)}" for kind, phases in FAULT_PHASES.items())
        raise ValueError(f"{FAULT_ENV} must be one of {options}, got {spec!r}")
    return parts[0], int(parts[1]), parts[2]


def _die_at(fault, kind: str, n: int, phase: str) -> None:
    """SIGKILL this process if ``fault`` names this point: the death a preempted job dies, with no cleanup."""
    if fault == (kind, n, phase):
        os.kill(os.getpid(), signal.SIGKILL)
        os._exit(137)  # not reached where SIGKILL exists


def _run_settings(cfg: DemoConfig) -> dict:
    return {name: getattr(cfg, name) for name in RUN_SETTINGS}


def _resume(path: str, cfg: DemoConfig, model, opt, batches: torch.Generator) -> tuple[dict, int]:
    """Load the checkpoint at ``path`` into the model, optimizer and every RNG; the history and the step."""
    state = checkpoint.load(path, map_location=cfg.device)
    missing = {"model", "optimizer", "history", "step", "rng", "settings"} - set(state)
    if missing:
        raise checkpoint.CheckpointError(f"checkpoint {path} has no {sorted(missing)}: it was not written by this demo")
    saved, mine = state["settings"], _run_settings(cfg)
    if saved != mine:
        diff = ", ".join(f"{k}={saved.get(k)!r} (now {mine[k]!r})" for k in mine if saved.get(k) != mine[k])
        raise checkpoint.CheckpointError(
            f"checkpoint {path} was written by a run with other settings: {diff}; resume with the same settings "
            "(only --steps and --save-every may change) or use another --out"
        )
    step = int(state["step"])
    if step > cfg.steps:
        raise checkpoint.CheckpointError(f"checkpoint {path} is at step {step}, past --steps {cfg.steps}")
    threads = state.get("cpu_threads")
    if cfg.device == "cpu" and threads != torch.get_num_threads():
        # Measured: 39 of the demo's 53 model and optimizer tensors differ after 200 steps on 1 or 2 threads.
        warnings.warn(
            f"checkpoint {path} was written by a process with {threads} CPU threads, this one has "
            f"{torch.get_num_threads()}: CPU kernels split their sums by thread, so the resumed run will not be "
            f"bitwise the run that never stopped (set OMP_NUM_THREADS={threads} for that)",
            stacklevel=3,
        )
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    checkpoint.set_rng_state(state["rng"], {"batches": batches})
    history = state["history"]
    # The previous run's last step was recorded only because that run ended there: the run that never
    # stopped has no such entry.
    if step < cfg.steps and history["step"] and history["step"][-1] == step - 1 and (step - 1) % HISTORY_EVERY:
        history = {k: v[:-1] for k, v in history.items()}
    return history, step


def train(cfg: DemoConfig) -> dict:
    """Train (or resume) and return the held-out metrics, first/last losses and the paths written.

    Resumed from its checkpoint (``cfg.resume``), a run continues exactly: it ends with the weights, the
    optimizer state and the history of the run that never stopped (bitwise, on the CPU; on CUDA with
    ``cfg.deterministic``). A checkpoint that cannot be trusted, or that another configuration wrote,
    raises :class:`vqtriton.checkpoint.CheckpointError`; with ``cfg.resume`` and no checkpoint, the run
    starts at step 0.
    """
    from tqdm import tqdm

    for name in ("steps", "batch", "save_every"):
        checks.integer(name, getattr(cfg, name), 1)
    fault = _fault_plan()
    os.makedirs(cfg.out, exist_ok=True)
    ckpt_path = os.path.join(cfg.out, CHECKPOINT)
    removed = checkpoint.remove_stale_temp_files(ckpt_path)  # what killed saves left: never read
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if cfg.deterministic:
        if cfg.device.startswith("cuda"):  # cuBLAS is deterministic only with a fixed workspace
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(cfg.seed)  # Python's and NumPy's too: the checkpoint holds all three
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        train_x, held = load_digits(cfg.device, cfg.seed)
        model = build_model(cfg)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        batches = torch.Generator(device="cpu").manual_seed(cfg.seed)
        history = {k: [] for k in ("step", "reconstruction", "codebook", "commitment", "perplexity")}
        start, resumed = 0, cfg.resume and os.path.exists(ckpt_path)
        if resumed:
            history, start = _resume(ckpt_path, cfg, model, opt, batches)
        bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not cfg.progress, desc="demo")
        for step in bar:
            batch = train_x[torch.randint(0, len(train_x), (cfg.batch,), generator=batches).to(cfg.device)]
            recon, vq_loss, info = step_losses(model, batch)
            _die_at(fault, "step", step, "forward")
            opt.zero_grad(set_to_none=True)
            (recon + vq_loss).backward()
            _die_at(fault, "step", step, "backward")
            opt.step()
            _die_at(fault, "step", step, "update")
            if step % HISTORY_EVERY == 0 or step == cfg.steps - 1:
                history["step"].append(step)
                history["reconstruction"].append(recon.item())
                history["codebook"].append(info.codebook_loss.item())
                history["commitment"].append(info.commitment_loss.item())
                history["perplexity"].append(info.perplexity.item())
                bar.set_postfix(loss=f"{recon.item():.4f}", usage=f"{info.usage.item():.2f}")
            if (step + 1) % cfg.save_every == 0 or step == cfg.steps - 1:
                # Everything the next step depends on: weights and buffers (EMA statistics, initted),
                # Adam's moments and step counts, the batch sampler's and every global RNG's state.
                state = {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "rng": checkpoint.rng_state({"batches": batches}),
                    "history": history,
                    "step": step + 1,
                    "settings": _run_settings(cfg),
                    "cpu_threads": torch.get_num_threads(),
                }
                hook = None if fault is None else (lambda phase, n=step + 1: _die_at(fault, "save", n, phase))
                checkpoint.save(state, ckpt_path, _hook=hook)
        metrics = evaluate(model, held)
        plot(model, held, history, cfg.out)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    metrics.update(
        first_reconstruction=history["reconstruction"][0] if history["reconstruction"] else math.nan,
        last_reconstruction=history["reconstruction"][-1] if history["reconstruction"] else math.nan,
        steps=cfg.steps,
        resumed_from=start if resumed else None,
        removed_temp_files=removed,
        checkpoint=ckpt_path,
        reconstructions=os.path.join(cfg.out, "reconstructions.png"),
        training=os.path.join(cfg.out, "training.png"),
    )
    return metrics


def baseline_reconstruction(held: torch.Tensor) -> float:
    """Error of predicting the mean image: what a model that learned nothing would score."""
    return float(((held - held.mean(0, keepdim=True)) ** 2).mean())


__all__ = ["DemoConfig", "train", "load_digits", "build_model", "baseline_reconstruction"]
