"""`spdecode plan`: what each part of decoding costs on this hardware (costs.py, read by
cost_model.py), a simulator that drives the engine core with those costs instead of a model
(simulate.py, predict.py), the planner's table (planner.py) and its check against measurements
(validate.py)."""
