"""The VisionFT operator: runs VisionFineTune resources as Kubernetes Jobs and reports their status.

Torch-free by design: it imports the shared schema (`visionft_api`), Kopf and the kubernetes client only.
`main.py` registers the handlers; each handler lives in `handlers/`; the pure parts (rendering of child
objects, status derivation, policy) live in their own modules and are unit-tested without a cluster.
"""
