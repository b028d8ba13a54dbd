"""``mimcli eval``: frozen-feature protocols. :mod:`~mimcli.evaluate.runner` extracts features
once per model and runs every protocol; one module per protocol: :mod:`~mimcli.evaluate.knn`
(also refine's monitor), :mod:`~mimcli.evaluate.linear`, :mod:`~mimcli.evaluate.lowshot`,
:mod:`~mimcli.evaluate.cluster`."""
