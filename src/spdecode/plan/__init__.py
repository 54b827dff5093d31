"""`spdecode plan`: what each part of decoding costs on this hardware (costs.py); the simulator
and planner built on those costs come next (see the issue on the planner)."""
