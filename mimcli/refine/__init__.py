"""``mimcli refine``: :mod:`~mimcli.refine.config` (options and results),
:mod:`~mimcli.refine.setup` (checks, defaults, resume options, the trainable encoder),
:mod:`~mimcli.refine.loop` (the :class:`~mimcli.refine.loop.Refiner` and its training loop),
:mod:`~mimcli.refine.monitor` (k-NN during training), :mod:`~mimcli.refine.pipeline`
(``run_refine``: probe if asked, then the loop). Import from those modules; this one stays
empty so importing a part does not import the whole."""
