"""The demo: a small workload standing in for a database node, and the scenario that drives it.

:mod:`byoc_demo.workload` is the HTTP service the ``process`` driver supervises in the demo and
the tests (``byoc-demo-workload`` on the command line).
"""
