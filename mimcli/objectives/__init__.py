"""Training objectives, one module per objective; each loss is a pure function of tensors."""

from mimcli.objectives.nna import alignment, multiview_loss, nna_loss, nnclr_loss

__all__ = ["alignment", "multiview_loss", "nna_loss", "nnclr_loss"]
