"""Data: the ShapesWorld generator and readers for the field's formats (webdataset pairs, CLIP_benchmark
zero-shot tasks, COCO captions, VQAv2, POPE, LLaVA instructions). Import the submodules you need."""
