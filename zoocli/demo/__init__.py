"""The offline demo model of issue 14: a synthetic world (``world``), its eval set (``evalset``),
the LLaVA-architecture demo model (``model``), its training script (``python -m zoocli.demo.train``)
and reports on the trained model (``table``, ``projector``, ``heat``). ``--model demo-llava`` loads
the shipped checkpoint through ``zoocli.adapters.load_adapter``."""


def cli_description(doc: str) -> str:
    """A module docstring's first line as an ``--help`` description: without the trailing
    ``python -m ...`` literal or colon that the docstring uses to introduce itself."""
    return doc.splitlines()[0].split("``")[0].rstrip(" :")
