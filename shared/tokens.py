"""Where the signing token comes from: the environment (local) or Key Vault (Azure).

Both providers return the accepted tokens, current first, then the previous one during a
rotation. The Key Vault provider caches them with a TTL (once it has passed, the cached tokens
are still served while one background read replaces them), re-reads at once (rate-limited)
when a signature matches none of them, keeps serving the cached tokens when Key Vault fails,
and gives up on any read after a timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from typing import Any, Protocol

from .credentials import ProcessCredential
from .events import is_unicode

logger = logging.getLogger(__name__)


class TokenUnavailableError(RuntimeError):
    """No signing token can be obtained (Key Vault unreachable and nothing cached)."""


class TokenProvider(Protocol):
    async def get_tokens(self) -> Sequence[str]:
        """Accepted tokens, current first. Raises TokenUnavailableError."""
        ...

    async def refresh(self) -> bool:
        """Re-read now if allowed by the rate limit; True when the tokens were re-read."""
        ...


class StaticTokenProvider:
    """Tokens from settings (SMARTCAR_MANAGEMENT_TOKEN and the optional previous one)."""

    def __init__(self, current: str, previous: str | None = None) -> None:
        self._tokens: tuple[str, ...] = (current,) if not previous else (current, previous)

    async def get_tokens(self) -> Sequence[str]:
        return self._tokens

    async def refresh(self) -> bool:
        return False


class SecretProperties(Protocol):
    @property
    def version(self) -> str | None: ...
    @property
    def enabled(self) -> bool | None: ...
    @property
    def created_on(self) -> datetime | None: ...


class Secret(Protocol):
    @property
    def value(self) -> str | None: ...
    @property
    def properties(self) -> Any: ...


class SecretReader(Protocol):
    """The part of `azure.keyvault.secrets.aio.SecretClient` this module uses."""

    async def get_secret(self, name: str, version: str | None = None) -> Secret: ...

    def list_properties_of_secret_versions(
        self, name: str
    ) -> AsyncIterator[SecretProperties]: ...


class KeyVaultTokenProvider:
    """The current version of one Key Vault secret and the one before it, cached in memory.

    Once tokens are cached, no request waits on Key Vault for the TTL: past it the cached
    tokens are returned at once and one background read replaces them. Every read gives up
    after `read_timeout` seconds, well under the 15 s Smartcar waits for an answer.
    """

    def __init__(
        self,
        client: SecretReader,
        secret_name: str,
        *,
        ttl_seconds: float = 300.0,
        min_refresh_interval: float = 10.0,
        read_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._name = secret_name
        self._ttl = ttl_seconds
        self._min_refresh_interval = min_refresh_interval
        self._read_timeout = read_timeout
        self._clock = clock
        self._tokens: tuple[str, ...] = ()
        self._loaded_at: float | None = None
        self._last_attempt: float | None = None
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None

    async def get_tokens(self) -> Sequence[str]:
        loaded_at = self._loaded_at
        if loaded_at is not None:
            if self._expired(loaded_at):
                self._start_background_read()
            return self._tokens
        async with self._lock:
            if self._loaded_at is None:
                if self._rate_limited():
                    # Key Vault just failed and nothing is cached: answer 503 at once rather
                    # than queue every request behind another slow, failing read.
                    raise TokenUnavailableError(
                        f"the signing token could not be read from Key Vault secret "
                        f"{self._name!r}; retrying after {self._min_refresh_interval:g}s"
                    )
                await self._load()
        return self._tokens

    async def refresh(self) -> bool:
        """Re-read now unless a read was attempted less than `min_refresh_interval` ago.

        Called when a signature matches no cached token: the secret may have just been
        rotated. The rate limit keeps forged requests from hammering Key Vault, and it is
        checked before waiting on a read in progress (which is that recent attempt).
        """
        if self._rate_limited():
            return False
        async with self._lock:
            if self._rate_limited():
                return False
            await self._load()
            return True

    def _expired(self, loaded_at: float) -> bool:
        return self._clock() - loaded_at >= self._ttl

    def _rate_limited(self) -> bool:
        return (
            self._last_attempt is not None
            and self._clock() - self._last_attempt < self._min_refresh_interval
        )

    def _start_background_read(self) -> None:
        """Re-read the expired cache in a task of its own, one at a time."""
        if self._background is None or self._background.done():
            self._background = asyncio.create_task(self._read_in_background())

    async def _read_in_background(self) -> None:
        async with self._lock:
            loaded_at = self._loaded_at
            if loaded_at is not None and not self._expired(loaded_at):
                return  # a refresh() re-read while this task waited for the lock
            await self._load()  # tokens are cached: this never raises

    async def _load(self) -> None:
        """Read the tokens; a failure keeps the cached ones (logged, tried again after
        `min_refresh_interval`), and raises TokenUnavailableError when none are cached."""
        self._last_attempt = self._clock()
        try:
            tokens = await self._read_within_timeout()
        except Exception as exc:
            if self._tokens:
                logger.warning(
                    "Key Vault read of secret %r failed (%s); keeping the cached token",
                    self._name,
                    type(exc).__name__,
                )
                # Try again after a short pause rather than on every request.
                self._loaded_at = self._clock() - self._ttl + self._min_refresh_interval
                return
            logger.error(
                "Key Vault read of secret %r failed: %s: %s",
                self._name,
                type(exc).__name__,
                exc,
            )
            raise TokenUnavailableError(
                f"the signing token could not be read from Key Vault secret {self._name!r}: "
                f"{type(exc).__name__}"
            ) from exc
        self._tokens = tokens
        self._loaded_at = self._clock()

    async def _read_within_timeout(self) -> tuple[str, ...]:
        """`_read`, given up after `read_timeout` seconds (the SDK's own limits are minutes)."""
        deadline = asyncio.timeout(self._read_timeout)
        try:
            async with deadline:
                return await self._read()
        except TimeoutError:
            if not deadline.expired():  # the client's own timeout, with its own message
                raise
            raise TimeoutError(
                f"no answer within {self._read_timeout:g}s"
            ) from None

    async def close(self) -> None:
        """Stop a background read, then close the Key Vault client (its HTTP session); the
        credential is the process's."""
        background = self._background
        if background is not None:
            background.cancel()
            await asyncio.wait([background])
        close = getattr(self._client, "close", None)
        if close is not None:
            await close()

    async def _read(self) -> tuple[str, ...]:
        current = await self._client.get_secret(self._name)
        current_value = current.value
        if not current_value:
            raise TokenUnavailableError(f"Key Vault secret {self._name!r} has no value")
        # JSON's \ud800 escape decodes to a lone surrogate, which no HMAC key can be made of.
        if not is_unicode(current_value):
            raise TokenUnavailableError(
                f"Key Vault secret {self._name!r} is not valid Unicode text: set it to the "
                "token exactly as Smartcar's Dashboard shows it"
            )
        current_version = getattr(current.properties, "version", None)
        previous_value = await self._read_previous(current_version)
        if previous_value and previous_value != current_value:
            return (current_value, previous_value)
        return (current_value,)

    async def _read_previous(self, current_version: str | None) -> str | None:
        """The version created just before the current one, when it is enabled.

        Only that one: after a rotation the old token keeps working until it is disabled,
        and older versions never come back, even if nobody disabled them.
        """
        versions = [
            props
            async for props in self._client.list_properties_of_secret_versions(self._name)
        ]

        def created(props: SecretProperties) -> float:
            return props.created_on.timestamp() if props.created_on is not None else 0.0

        current = next((p for p in versions if p.version == current_version), None)
        older = [
            p for p in versions
            if p.version != current_version
            and (current is None or created(p) <= created(current))
        ]
        if not older:
            return None
        previous_props = max(older, key=created)
        if previous_props.enabled is False:
            return None
        previous = await self._client.get_secret(self._name, previous_props.version)
        value = previous.value
        if isinstance(value, str) and value and not is_unicode(value):
            # The older token is a courtesy during a rotation: without it the current works.
            logger.warning("Key Vault secret %r: the previous version is not valid Unicode "
                           "text; only the current version is accepted", self._name)
            return None
        return value if isinstance(value, str) and value else None


def build_key_vault_provider(
    vault_uri: str, secret_name: str, *, ttl_seconds: float, credential: ProcessCredential
) -> KeyVaultTokenProvider:
    """The production provider: async SecretClient with the process's shared credential."""
    from azure.keyvault.secrets.aio import SecretClient

    client: Any = SecretClient(vault_url=vault_uri, credential=credential.get())
    return KeyVaultTokenProvider(client, secret_name, ttl_seconds=ttl_seconds)
