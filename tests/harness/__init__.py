"""Real components for the tests: the Kubernetes control plane (etcd, kube-apiserver, controller-manager,
scheduler, kwok) and the S3-compatible server. Nothing here is a mock: each launcher starts the real binary
on loopback and stops it at the end."""
