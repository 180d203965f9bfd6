"""Periodic zero-shot evaluation during ``dvd train clip``: clean and short-PGD accuracy on ShapesWorld
tasks through :mod:`dvd.eval.zeroshot`, written to ``OUTPUT_DIR/eval.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from dvd.config import parse_eps
from dvd.data.transforms import image_transform
from dvd.data.zeroshot import load_zeroshot
from dvd.eval.results import write_rows
from dvd.eval.zeroshot import evaluate_zeroshot
from dvd.models.clip import DvdCLIP, create_clip
from dvd.train.checkpoint import full_model_state
from dvd.train.clip_config import ClipTrainConfig
from dvd.train.clip_data import detect_format
from dvd.train.clip_export import export_key
from dvd.train.clip_resolution import Resolution
from dvd.train.distributed import DistEnv, barrier, is_fsdp
from dvd.train.scratch import random_init_expected


def make_evaluator(
    cfg: ClipTrainConfig, clip: DvdCLIP, resolution: Resolution, env: DistEnv, model: nn.Module
) -> Callable[[int], dict[str, float]] | None:
    """Clean and short-PGD zero-shot accuracy on ShapesWorld tasks, via :mod:`dvd.eval.zeroshot`."""
    root = cfg.eval_data or (cfg.data if detect_format(cfg) == "shapesworld" else None)
    if cfg.eval_every <= 0 or root is None:
        return None
    eps = parse_eps(cfg.eval_eps)

    def evaluated_model() -> DvdCLIP | None:
        """The CLIP to evaluate on rank 0: itself, or under FSDP an unsharded copy (collective)."""
        if not is_fsdp(model):
            return clip if env.is_main else None
        state = full_model_state(model)
        if not env.is_main:
            return None
        name = clip.model_name if not Path(cfg.model).is_dir() else cfg.model
        with random_init_expected():  # the trained weights are loaded next
            copy = create_clip(name, device=env.device)
        copy.model.load_state_dict({export_key(k): v for k, v in state.items() if export_key(k)})
        copy.set_normalization(clip.mean.flatten().tolist(), clip.std.flatten().tolist())
        return copy

    def evaluate(step: int) -> dict[str, float]:
        scores: dict[str, float] = {}
        resolution.set(resolution.native)
        subject = evaluated_model()
        if subject is not None:
            rows = []
            for task in cfg.eval_tasks:
                folder = Path(root) / "zeroshot" / task
                data = load_zeroshot(folder, transform=image_transform(clip.image_size))
                rows += evaluate_zeroshot(
                    subject, data, eps_list=[eps], attack="pgd", steps=cfg.eval_attack_steps,
                    limit=cfg.eval_samples, batch_size=cfg.eval_batch_size, seed=cfg.seed,
                    model_name=f"{cfg.recipe}@step{step}", dataset_name=f"shapesworld/{task}", progress=False,
                )
            for row in rows:
                task = row.dataset.split("/")[-1]
                scores[f"eval/{task}/clean"] = row.clean
                scores[f"eval/{task}/robust"] = row.adversarial
            scores["eval/mean_clean"] = sum(r.clean for r in rows) / len(rows)
            scores["eval/mean_robust"] = sum(r.adversarial for r in rows) / len(rows)
            write_rows(Path(cfg.output_dir) / "eval.json", rows)
        barrier(env)
        return scores

    return evaluate
