"""``python -m providers.simulator --port 8765 [--host H] [--seed N] [--config file.json]``."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from providers.simulator.server import Simulator


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and serve until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m providers.simulator", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--config", type=Path, default=None, help="JSON file merged into the defaults"
    )
    args = parser.parse_args(argv)
    config: dict[str, Any] = json.loads(args.config.read_text()) if args.config else {}
    if args.seed is not None:
        config["seed"] = args.seed
    sim = Simulator(config)
    print(
        f"provider simulator on http://{args.host}:{args.port} (/vapi, /synthflow/v2)",
        file=sys.stderr,
    )
    with contextlib.suppress(KeyboardInterrupt):
        sim.serve_forever(args.port, args.host)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
