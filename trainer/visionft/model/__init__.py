"""The model layer: loading a VLM, adding LoRA, saving it, and what the trainer knows about each architecture.

``FastVisionModel`` (``fast_vision_model``) groups ``loading.from_pretrained``, ``lora.get_peft_model`` and
the save methods of ``saving``. ``architectures`` holds one ``ArchSpec`` per architecture family, and
``classify`` sorts a model's Linear modules into vision/language x attention/MLP groups.
"""
