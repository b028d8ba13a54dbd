"""k-NN monitoring during refinement (``refine --val``): the last block's CLS and mean-patch
weighted k-NN (k=20, tau 0.07), computed exactly as ``mimcli eval`` computes it."""

from __future__ import annotations

import torch
from torch import nn

from mimcli.data import ImageList, eval_transform, subsample
from mimcli.datasources import Columns, open_images
from mimcli.errors import MimcliError
from mimcli.evaluate.knn import last_block_knn
from mimcli.features import extract_features
from mimcli.refine.config import RefineConfig

K, TAU = 20, 0.07


class Monitor:
    """k-NN of the last block on labelled folders: ``--data`` as memory, ``--val`` as queries."""

    def __init__(self, cfg: RefineConfig, train: ImageList, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        assert cfg.val is not None
        if not train.labelled:
            raise MimcliError(f"--val needs labels in --data too; {cfg.data} has none")
        self.memory = subsample(train, cfg.val_limit, cfg.seed)
        columns = Columns(cfg.image_column, cfg.label_column)
        queries = open_images(cfg.val, labelled=True, what="--val", columns=columns)
        self.queries = subsample(queries, cfg.val_limit, cfg.seed)
        if self.memory.classes != self.queries.classes:
            raise MimcliError("--data and --val need the same classes for k-NN")

    def measure(self, encoder: nn.Module) -> dict[str, float]:
        """``{"cls": acc, "patch": acc}`` (%) of ``encoder`` now; its train/eval mode is kept."""
        was_training = encoder.training
        transform = eval_transform(encoder.pretrained_cfg)
        depth = len(encoder.blocks)  # type: ignore[arg-type]
        feats = [
            extract_features(
                encoder,
                imgs,
                transform,
                [depth],
                self.device,
                batch_size=256,
                num_workers=self.cfg.num_workers,
            )
            for imgs in (self.memory, self.queries)
        ]
        try:
            accs = last_block_knn(
                feats[0],
                feats[1],
                (K,),
                TAU,
                len(self.memory.classes),
                self.cfg.knn_backend,
                self.device,
            )
        finally:
            for f in feats:
                f.close()
        encoder.train(was_training)
        return {kind: a[K] for kind, a in accs.items()}
