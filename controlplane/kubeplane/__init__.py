"""A real local Kubernetes control plane (etcd, apiserver, controllers, scheduler, kwok) on loopback."""
