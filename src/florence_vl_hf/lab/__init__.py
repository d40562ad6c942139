"""The research lab: what was built to study and reproduce Florence-VL, apart from the library a Hub user needs.

- `shapes`: the ShapesVQA generator (synthetic images, captions, questions) and its scoring;
- `shapes_recipe`, `region_pretraining`, `evaluate`, `bundle`: the recipe that trains the bundled florence-vl-tiny,
  its vision-tower region pre-training, its evaluation and its bundling into the package;
- `ablations`: the fusion and feature ablations of the tiny model;
- `alignment`, `alignment_cli`: the paper's vision-language alignment analysis;
- `fixture`: tiny random checkpoints in the original Florence-VL layout, for conversion tests and the demo;
- `cli`: their `florence-vl` commands, registered through the `florence_vl_hf.commands` entry point.

The lab imports the core (`florence_vl_hf.modeling`, `processing`, `conversion`, `training`, ...); the core never
imports the lab (tests/test_layout.py checks it).
"""
