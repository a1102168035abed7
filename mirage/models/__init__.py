"""The models stage: what turns a B-scan into class logits.

    backbones.py           the encoders of the other families (ViT/timm, SAM) and their checks
    segmentation_model.py  the MIRAGE encoder and SegmentationModel (backbone + decoder)
    input_adapters.py      the patch projector and position-embedding resampling
    decoders/              one file per decoder, found by name (the --output_adapter registry)

Which family a weights file is, and how its checkpoint is read, is the registry's job
(fm_seg_config.py at the top level). This stage stands on the ground floor only.
"""
