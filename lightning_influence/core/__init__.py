"""The numerical core: tasks, data access, the functional model, gradients, curvature, scores."""
