"""Lull's data plane: engine replicas, KV connector plug-ins and node agents."""
