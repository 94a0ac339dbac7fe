"""Per-iteration schedules: DINO's cosine with linear warm-up, used for lr, weight decay and teacher momentum."""
import numpy as np


def cosine_schedule(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0.0,
                    warmup_endpoint=True):
    """Linear warm-up from start_warmup_value to base_value, then a half cosine from base_value to final_value.

    One value per iteration (epochs * niter_per_ep), as facebookresearch/dino's cosine_scheduler; a warm-up longer
    than the run is cut short rather than refused. warmup_endpoint=False gives MAE's lr_sched instead: the warm-up
    value at iteration t is base_value * t / warmup_iters, reaching base_value only at the first cosine step.
    """
    warmup_iters = int(warmup_epochs * niter_per_ep)
    total = int(epochs * niter_per_ep)
    warmup = np.array([])
    if warmup_iters > 0:
        warmup = np.linspace(start_warmup_value, base_value, warmup_iters, endpoint=warmup_endpoint)
    iters = np.arange(max(total - warmup_iters, 0))
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, cosine))[:total]
