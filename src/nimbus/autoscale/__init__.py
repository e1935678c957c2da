"""Autoscaling decisions: pure functions of samples and ``now``.

- :mod:`nimbus.autoscale.decider`: ``ScalingConfig``, ``Decider`` and its
  ``Decision`` (how many instances a function version should have).
- :mod:`nimbus.autoscale.window`: bucketed averages of the sampled level.
- :mod:`nimbus.autoscale.simulate`: run a ``Decider`` over a traffic trace
  and get the instance curve (tests, benches, what-if runs).

Nothing here sleeps, reads a clock or does I/O; the loop that samples pools
and applies decisions is :mod:`nimbus.worker.autoscaler`.
"""
