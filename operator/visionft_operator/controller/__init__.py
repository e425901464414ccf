"""The controller machinery, in the manner of controller-runtime: what any operator needs and none of it
about fine-tuning.

- ``cache.py``: the informer-style read cache of resources, Jobs and pods, filled by watch events and lists;
- ``workqueue.py``: the de-duplicating, rate-limited work queue and its workers;
- ``expectations.py``: what this process wrote that the cache has not shown yet;
- ``clock.py``: the clock a reconciler reads (injectable, so that tests fix time);
- ``kube.py``: the few API calls, on the kubernetes client;
- ``peering.py``: which replica acts when several run;
- ``metrics.py`` and ``logs.py``: Prometheus metrics and structured logs.

The domain (what a VisionFineTune's children, phase and conditions are) lives one level up and imports
from here, never the other way round.
"""
