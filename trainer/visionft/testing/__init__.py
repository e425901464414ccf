"""Test helpers that ship with the package: tiny offline VLMs (``visionft.testing.tiny``) and the
small LoRA the patching tests use (``visionft.testing.lora``)."""
