"""specmesh clients: the Python SDK (`Client`, `AsyncClient`) and the `specmesh` CLI."""
from .sdk import (AsyncClient, Chunk, Client, Completion, DeadlineExceededError, InvalidArgumentError, ModelInfo,
                  PlannerReport, RequestCancelledError, ResourceExhaustedError, Speculation, SpecmeshClientError,
                  UnavailableError, Usage)

__all__ = ["AsyncClient", "Chunk", "Client", "Completion", "DeadlineExceededError", "InvalidArgumentError",
           "ModelInfo", "PlannerReport", "RequestCancelledError", "ResourceExhaustedError", "Speculation",
           "SpecmeshClientError", "UnavailableError", "Usage"]
