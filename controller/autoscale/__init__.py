"""Elastic engine replicas: the pure scaling policy (``policy``) and the Kubernetes
side (``kube``, imported on its own so that the policy needs no ``kubernetes``)."""

from controller.autoscale.policy import (
    AutoscaleSettings,
    Reason,
    ReplicaLoad,
    ScaleDecision,
    ScalerState,
    ScalingSnapshot,
    decide,
)

__all__ = ["AutoscaleSettings", "Reason", "ReplicaLoad", "ScaleDecision", "ScalerState", "ScalingSnapshot", "decide"]
