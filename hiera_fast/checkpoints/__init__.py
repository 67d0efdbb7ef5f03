"""Checkpoints and ``config.json`` formats, in one place: the key maps, file readers and config readers of every
library whose weights hiera-fast loads.

- :mod:`.hiera`: Hiera from transformers (our module names are its names), the official ``hiera`` package
  (``.pth`` files and hub-mixin directories) and timm (state dicts, hub directories), Hugging Face hub ids;
  :class:`~.hiera.PretrainedMixin` gives the models ``from_pretrained`` / ``save_pretrained``.
- :mod:`.sam2`: SAM 2's Hiera trunk from the official ``sam2`` and ultralytics ``.pt`` files, transformers
  ``Sam2Model`` / ``Sam2HieraDetModel`` directories and timm ``hieradet_sam2`` state dicts.
"""
