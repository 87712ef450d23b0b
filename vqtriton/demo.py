"""``vqtriton demo``: train a small convolutional VQ-VAE on scikit-learn's digits.

The 1,797 8x8 digit images ship inside scikit-learn (no download). The encoder maps an image to a
4x4 grid of D-dim latents, the VectorQuantizer (channel-first) snaps each to one of K codes, the
decoder reconstructs the image. Training shows a progress bar; the end prints held-out
reconstruction error, perplexity and codebook usage and writes ``reconstructions.png`` and
``training.png``. A checkpoint is written atomically; ``--resume`` continues from it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import nn

CHECKPOINT = "checkpoint.pt"
SAVE_EVERY = 250


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


def save_atomic(state: dict, path: str) -> None:
    """Write a checkpoint whole or not at all: a temp file beside it, then an atomic rename."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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


def train(cfg: DemoConfig) -> dict:
    """Train (or resume) and return the held-out metrics, first/last losses and the paths written."""
    from tqdm import tqdm

    os.makedirs(cfg.out, exist_ok=True)
    torch.manual_seed(cfg.seed)
    train_x, held = load_digits(cfg.device, cfg.seed)
    model = build_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    history = {k: [] for k in ("step", "reconstruction", "codebook", "commitment", "perplexity")}
    start = 0
    ckpt_path = os.path.join(cfg.out, CHECKPOINT)
    if cfg.resume and os.path.exists(ckpt_path):
        state = torch.load(ckpt_path, map_location=cfg.device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        history, start = state["history"], int(state["step"])
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + start)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not cfg.progress, desc="demo")
    for step in bar:
        batch = train_x[torch.randint(0, len(train_x), (cfg.batch,), generator=gen).to(cfg.device)]
        recon, vq_loss, info = step_losses(model, batch)
        opt.zero_grad(set_to_none=True)
        (recon + vq_loss).backward()
        opt.step()
        if step % 10 == 0 or step == cfg.steps - 1:
            history["step"].append(step)
            history["reconstruction"].append(recon.item())
            history["codebook"].append(info.codebook_loss.item())
            history["commitment"].append(info.commitment_loss.item())
            history["perplexity"].append(info.perplexity.item())
            bar.set_postfix(loss=f"{recon.item():.4f}", usage=f"{info.usage.item():.2f}")
        if (step + 1) % SAVE_EVERY == 0 or step == cfg.steps - 1:
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "history": history, "step": step + 1}
            save_atomic(state, ckpt_path)
    metrics = evaluate(model, held)
    plot(model, held, history, cfg.out)
    metrics.update(
        first_reconstruction=history["reconstruction"][0] if history["reconstruction"] else math.nan,
        last_reconstruction=history["reconstruction"][-1] if history["reconstruction"] else math.nan,
        steps=cfg.steps,
        checkpoint=ckpt_path,
        reconstructions=os.path.join(cfg.out, "reconstructions.png"),
        training=os.path.join(cfg.out, "training.png"),
    )
    return metrics


def baseline_reconstruction(held: torch.Tensor) -> float:
    """Error of predicting the mean image: what a model that learned nothing would score."""
    return float(((held - held.mean(0, keepdim=True)) ** 2).mean())


__all__ = ["DemoConfig", "train", "load_digits", "build_model", "baseline_reconstruction"]
