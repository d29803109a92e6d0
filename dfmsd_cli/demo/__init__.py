"""``dfmsd demo``: the end-to-end DFMSD run on synthetic data (see ``run.py``)."""

from dfmsd_cli.demo.run import DemoConfig, run_demo

__all__ = ["DemoConfig", "run_demo"]
