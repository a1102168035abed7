"""The models stage: what turns a B-scan into class logits.

    backbones.py           the encoders of the other families (ViT/timm, SAM), their checks
                           and the loaders of their published files
    segmentation_model.py  the MIRAGE encoder and SegmentationModel (backbone + decoder)
    mirage_checkpoint.py   the published MIRAGE checkpoint layout, read into a MirageEncoder
    input_adapters.py      the patch projector and position-embedding resampling
    input_geometry.py      sizes as (h, w) and the patch sizes they must fit
    decoders/              one file per decoder, found by name (the --output_adapter registry)

Which family a weights file is, and which loader reads it, is the registry's job
(fm_seg_config.py at the top level). This stage stands on the ground floor only.
"""
