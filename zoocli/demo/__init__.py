"""The offline demo model of issue 14: a synthetic world (``world``), its eval set (``evalset``),
the LLaVA-architecture demo model (``model``), its training script (``python -m zoocli.demo.train``)
and reports on the trained model (``table``, ``projector``, ``heat``). ``--model demo-llava`` loads
the shipped checkpoint through ``zoocli.adapters.load_adapter``."""
