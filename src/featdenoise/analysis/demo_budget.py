"""The demo's budget (:mod:`featdenoise.analysis.demo`): how much it trains and evaluates
(:class:`Budget`, with :data:`FULL` for ``make demo`` and :data:`QUICK` for tests) and the
L-inf eps of every attack it runs."""

from __future__ import annotations

from dataclasses import dataclass

EPS = 0.1  # L-inf budget on the [0, 1] pixel scale (25.5 on 0..255)


@dataclass(frozen=True)
class Budget:
    """How much the demo trains and evaluates (all sizes in images, steps in PGD iterations).

    ``train_step_size`` and ``eval_step_size`` are on the [0, 1] scale; the attacks use the paper's
    step rule ``max(step_size, eps / steps)`` (Sec. 6.1).
    """

    width: int = 8                  # small_resnet width (stages of 8, 16, 32 channels)
    denoise: str = "nonlocal_dot"   # denoising op of the adv-denoise net
    train_images: int = 9000        # fixed random subset of the 60k training images
    epochs: int = 3
    milestones: tuple = (2,)        # lr / 10 after these epochs
    batch_size: int = 128
    lr: float = 0.1                 # per 64 images (scaled linearly with the batch)
    train_steps: int = 3            # PGD iterations when crafting training examples
    train_step_size: float = 0.04
    train_targeted: bool = True     # the paper trains against targeted PGD (Sec. 5)
    eval_images: int = 500          # fixed random subset of the 10k test images
    eval_steps: tuple = (10, 100)
    eval_step_size: float = 0.01
    eval_batch_size: int = 100
    viz_images: int = 3
    aa_images: int = 100            # AutoAttack (standard) on this many fixed test images
    aa_budget: tuple = ()           # (steps, targets, queries); () = AutoAttack's own


FULL = Budget()
QUICK = Budget(train_images=256, epochs=1, milestones=(), batch_size=64, train_steps=1,
               eval_images=32, eval_steps=(2, 5), eval_batch_size=32, viz_images=2,
               aa_images=16, aa_budget=(3, 3, 30))
