"""The ClientApp: thin wiring from Flower messages to :mod:`mosaic_flwr.client`."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from mosaic_flwr.client import handle_evaluate, handle_train

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training on this node's partition."""
    return handle_train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Client-side evaluation of the global model (used when fraction-evaluate > 0)."""
    return handle_evaluate(msg, context)
