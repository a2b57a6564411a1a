"""The edge of rankseg-monai: files (:mod:`~rankseg_monai.app.io`), the command line
(:mod:`~rankseg_monai.app.cli`), per-case evaluation and reports (:mod:`~rankseg_monai.app.evaluation`), the demo
(:mod:`~rankseg_monai.app.demo`) and its synthetic data (:mod:`~rankseg_monai.app.synthetic`).

These modules import the core (options, functional, transforms, metrics); nothing in the core imports them.
"""
