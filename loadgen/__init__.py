"""Lull's workload side: real-trace loading and scaling, replay and simulation."""
