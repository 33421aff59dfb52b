"""`spear bench`: spear's figures and raw NATS's, measured in one run, black-box over the contract.

Against a `spear up` it starts itself (a temporary data dir, any free ports), or against the spear
at `--nats-url` (and `--http-url`). Every phase is bounded in count and in time; progress goes to
stderr, the result to stdout (a table, or one JSON object with `--json`). The raw NATS figures
(a core request-reply round trip, an acked JetStream publish) are the floor spear's figures are
compared with: `ratios` says how many round trips a SYNC call costs, and what share of NATS's own
rates spear reaches.
"""

from spear.cli.bench.command import add_parser, command, free_port, stop_on_close
from spear.cli.bench.measure import CpuMeter, backpressure_s

__all__ = ["CpuMeter", "add_parser", "backpressure_s", "command", "free_port", "stop_on_close"]
