"""Evidence masks (equation 5): class activation maps of the three encoder units from the classifier's weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def evidence_masks(encoder_features: Sequence[torch.Tensor], weight: torch.Tensor) -> list[torch.Tensor]:
    """Evidence masks of every class, before cropping.

    ``V_l[b, j] = Σ_k F_el[b, k] · w[j, offset_l + k]``, with the weights of the one linear layer of equation 4
    (its columns are the concatenated GAP features of the three units, in order). No ReLU, no normalisation: the
    spatial mean of ``V_l[:, j]`` summed over the units is exactly the logit of class j (the layer has no bias).

    Parameters
    ----------
    encoder_features : three tensors (B, C_l, z_l, y_l, x_l)
        Outputs of the encoder units (paper: 64, 128, 256 channels).
    weight : (K, Σ C_l) tensor
        The linear layer's weight.

    Returns
    -------
    list of three (B, K, z_l, y_l, x_l) tensors
    """
    masks = []
    offset = 0
    for features in encoder_features:
        channels = features.shape[1]
        masks.append(torch.einsum("bkzyx,jk->bjzyx", features, weight[:, offset : offset + channels]))
        offset += channels
    if offset != weight.shape[1]:
        raise ValueError(f"encoder features have {offset} channels, the linear layer expects {weight.shape[1]}")
    return masks


def select_class(masks: Sequence[torch.Tensor], class_index: torch.Tensor) -> list[torch.Tensor]:
    """Pick one class per sample from :func:`evidence_masks` output.

    Parameters
    ----------
    masks : three (B, K, z, y, x) tensors
    class_index : (B,) long tensor
        The predicted class (``logits.argmax(1)``), the label, or any class of interest.

    Returns
    -------
    list of three (B, 1, z, y, x) tensors
    """
    out = []
    for mask in masks:
        index = class_index.to(mask.device).long().view(-1, 1, 1, 1, 1).expand(-1, 1, *mask.shape[2:])
        out.append(torch.gather(mask, 1, index))
    return out
