"""Load a model from a checkpoint folder: the one place that reads its assets, builds it and loads its weights.

    loaded = load_model(path, model_cfg, groups=model_groups(tp, pp), micro_batch_tokens=4096)
    scorer = loaded.scorer(stage_dp_rank)      # the model itself at the job's layout, else a RoutedScorer
    engine = make_engine("megatron", loaded, ...)                       # rollout.factory reads loaded.path / .groups

Serves the stage job's frozen models (teacher, reference), the trainable policy's starting weights, the base-model
evaluation and ``s2d eval``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_s2d.checkpoint.assets import ModelAssets
from megatron_s2d.config.schema import ModelConfig
from megatron_s2d.policy.model import MegatronModel


@dataclass(frozen=True)
class LoadedModel:
    """A model, the checkpoint folder its weights came from, and that folder's assets (tokenizer, stop ids; None for
    a model whose folder holds weights and meta only, e.g. one written by a benchmark)."""

    model: MegatronModel
    assets: ModelAssets | None
    path: Path

    @property
    def groups(self):
        """The model's layout (``runtime.groups.ModelGroups``)."""
        return self.model.groups

    def scorer(self, stage_dp_rank: int):
        """The ``Scorer`` serving this rank's own rows: the model itself at the job's layout; at a layout of its own,
        a ``RoutedScorer`` that routes every rank's rows to the model's replicas (``policy.scorer``)."""
        if self.groups.is_global:
            return self.model
        from megatron_s2d.policy.scorer import RoutedScorer

        return RoutedScorer(self.model, stage_dp_rank)


def load_model(path: str | Path, model_cfg: ModelConfig, *, groups=None, micro_batch_tokens: int = 4096,
               seed: int = 1234, assets: ModelAssets | None = None, weights: bool = True) -> LoadedModel:
    """The model of checkpoint folder ``path`` at the layout of ``groups`` (None: the job's own at
    ``model_cfg.tp/pp``), its weights loaded (collective). ``weights=False``: built without them (a trainable policy
    that resumes from a training checkpoint loads its weights there)."""
    from megatron_s2d.checkpoint.model_ckpt import load_model_checkpoint

    path = Path(path)
    assets = assets if assets is not None else ModelAssets.load(path)
    model = MegatronModel(assets.arch, model_cfg, groups, seed=seed, initialize=False,
                          micro_batch_tokens=micro_batch_tokens)
    if weights:
        load_model_checkpoint(model.module, path)
    return LoadedModel(model=model, assets=assets, path=path)
