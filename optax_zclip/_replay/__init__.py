"""Replay: what each clipping rule would have done to a run already logged.

The data flows one way: the command (`_command`) reads a log (`_logs`),
the engine (`_engine`) replays its norms through the methods its specs name
(`_methods`), and the report (`_report`) summarises, tabulates and plots the
result. The engine knows nothing of files.
"""

from optax_zclip._replay._engine import replay

__all__ = ["replay"]
