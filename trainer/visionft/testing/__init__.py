"""Test helpers that ship with the package: tiny offline VLMs (``visionft.testing.tiny``)."""
