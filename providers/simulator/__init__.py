"""A local simulator of the Vapi and SynthFlow call APIs, for tests, the demo and benchmarks.

Run ``python -m providers.simulator --port 8765 [--seed N] [--config file.json]`` or, in-process,
``sim = Simulator(config).start(port=0)``; point a provider row's ``base_url`` at
``sim.vapi_url`` (``.../vapi``) or ``sim.synthflow_url`` (``.../synthflow/v2``).
Bearer keys come from ``SIM_API_KEYS`` (default ``sim-vapi-key,sim-synthflow-key``).
Config keys and defaults are in :data:`DEFAULT_CONFIG`; outcomes are seeded by
hash(seed, correlation id) and can be forced with ``outcomes_by_suffix``.
"""

from providers.simulator.engine import DEFAULT_CONFIG, OUTCOMES, Engine, SimCall
from providers.simulator.server import Simulator

__all__ = ["DEFAULT_CONFIG", "OUTCOMES", "Engine", "SimCall", "Simulator"]
