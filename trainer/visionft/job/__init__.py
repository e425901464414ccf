"""The job layer: one training job from a file to its outputs.

``cli`` (the ``visionft-train`` command) reads a file through ``config_file``, and ``run`` carries it out:
inputs located (``builtin`` generates the built-in ones), the model loaded and trained through the engine,
held-out answers scored (``evaluation``), the loss curve drawn (``plotting``), and progress written to the
VisionFineTune's status (``reporting``).
"""
