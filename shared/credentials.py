"""One Azure credential per process, shared by every Azure client and closed on shutdown.

The Service Bus publisher, the Key Vault token provider and the Blob spill store all use the
async (`azure.*.aio`) SDKs, so they share one async credential:

- `ManagedIdentityCredential(client_id=AZURE_CLIENT_ID)` when a client id is set (in Azure the
  Bicep sets it to the app's user-assigned identity): one token endpoint, no probing;
- `DefaultAzureCredential()` only where no client id is set (a developer's machine: `az login`,
  VS Code, environment variables).

Each credential holds an HTTP session and a token cache; one per process keeps one of each,
and `close()` releases them when the process stops.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

#: Builds the managed identity credential from a client id (a seam for tests).
ManagedIdentityFactory = Callable[[str], Any]
#: Builds the developer-machine credential (a seam for tests).
DefaultFactory = Callable[[], Any]


def _managed_identity(client_id: str) -> Any:
    from azure.identity.aio import ManagedIdentityCredential

    return ManagedIdentityCredential(client_id=client_id)


def _default() -> Any:
    from azure.identity.aio import DefaultAzureCredential

    return DefaultAzureCredential()


class ProcessCredential:
    """The process's credential, created on first use and reused by every client.

    `get()` is safe from any thread; the credential it returns is an async one and is used on
    the event loop that first uses it (the worker's, or the local host's).
    """

    def __init__(
        self,
        client_id: str | None,
        *,
        managed_identity: ManagedIdentityFactory = _managed_identity,
        default: DefaultFactory = _default,
    ) -> None:
        self.client_id = client_id
        self._managed_identity = managed_identity
        self._default = default
        self._credential: Any = None
        self._lock = threading.Lock()

    @property
    def kind(self) -> str:
        """`managed_identity` when a client id is set, else `default` (developer machine)."""
        return "managed_identity" if self.client_id else "default"

    def get(self) -> Any:
        if self._credential is None:
            with self._lock:
                if self._credential is None:
                    self._credential = (
                        self._managed_identity(self.client_id)
                        if self.client_id
                        else self._default()
                    )
        return self._credential

    async def close(self) -> None:
        """Close the credential if one was created; a later `get()` creates a new one."""
        with self._lock:
            credential, self._credential = self._credential, None
        if credential is not None:
            try:
                await credential.close()
            except Exception:  # shutting down: a failed close must not hide the real exit
                logger.warning("closing the Azure credential failed", exc_info=True)
