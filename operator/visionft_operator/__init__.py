"""The VisionFT operator: runs VisionFineTune resources as Kubernetes Jobs and reports their status.

Torch-free by design: it imports the shared schema (``visionft_api``), Kopf and the kubernetes client only.

- ``main.py`` wires the process; ``handlers/`` holds one module per event source and the periodic resync;
- ``reconciler.py`` runs one reconcile (observe, decide, act) and owns what the process remembers;
- ``decision.py`` is the decision function, pure, from what a reconcile observed to what it does;
- the domain, pure and unit-tested without a cluster: ``children.py`` (the objects a run owns), ``status.py``
  (phase and conditions), ``jobs.py`` (reading Jobs and pods), ``gang.py`` (multi-node restarts),
  ``deadline.py``, ``policy.py``, ``names.py``;
- ``controller/``: the machinery any operator needs (cache, work queue, API client, peering, metrics, logs).
"""
