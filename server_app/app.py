"""The ServerApp: thin wiring from Flower's Grid and Context to :mod:`mosaic_flwr.server`."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from mosaic_flwr.server import run_server

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Validate the run config, then run the configured strategy to the end."""
    run_server(grid, context)
