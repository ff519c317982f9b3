"""Endpoint doctor: check a receiver the way Smartcar does, and explain a signature.

    python -m shared.cli check-endpoint URL [--send-test-event] [--token T]
    python -m shared.cli explain-signature --body FILE --signature HEX [--token T]

This module finds the token these commands and `send` use: `--token`, else the one the app
itself verifies with, by the app's own rule (`Settings.token_source`): the Key Vault secret
named by KEY_VAULT_URI and SMARTCAR_TOKEN_SECRET_NAME whenever KEY_VAULT_URI is set, read by
the app's token provider (shared/tokens.py); else SMARTCAR_MANAGEMENT_TOKEN (and
SMARTCAR_PREVIOUS_MANAGEMENT_TOKEN), else the development token. The checks live in
`endpoint_check.py` and `signature_explain.py`; the command line in `doctor_cli.py`. No
token is ever printed: only where it came from.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from ..events import is_unicode
from ..settings import Settings
from ..tokens import KeyVaultTokenProvider, SecretReader, TokenUnavailableError


@dataclass(frozen=True, slots=True)
class Tokens:
    """The accepted tokens (current first) and where they came from; never printed."""

    values: tuple[str, ...]
    source: str  # "--token", "environment", "Key Vault secret <name>", "development token"

    def label(self, index: int) -> str:
        return f"{'current' if index == 0 else 'previous'} token ({self.source})"


class TokenError(RuntimeError):
    """No token could be had: the message says from where and what to do."""


def token_argument(text: str) -> str:
    """`--token` (argparse `type`), refused when it cannot key an HMAC: bytes the shell passed
    that are not UTF-8 arrive as lone surrogates. The value is never echoed."""
    if not is_unicode(text):
        raise argparse.ArgumentTypeError(
            "the token is not valid UTF-8 text (the shell passed bytes that do not decode): "
            "give it exactly as Smartcar's Dashboard shows it")
    return text


def secret_client(vault_uri: str, settings: Settings) -> SecretReader:
    """The app's Key Vault client (tests replace this boundary with a fake)."""
    from azure.keyvault.secrets.aio import SecretClient

    from ..credentials import ProcessCredential

    credential = ProcessCredential(settings.azure_client_id)
    client: Any = SecretClient(vault_url=vault_uri, credential=credential.get())
    return cast(SecretReader, client)  # the credential lives as long as the command


def resolve_tokens(token: str | None, settings_loader: Callable[[], Settings]) -> Tokens:
    """`--token`, else the tokens the app verifies with: Key Vault (through the app's token
    provider) or the environment, as `Settings.token_source` decides for the app."""
    if token is not None:
        return Tokens((token,), "--token")
    settings = settings_loader()
    if settings.token_source == "environment":  # noqa: S105 - where from, not a password
        assert settings.management_token is not None  # load_settings: a token or a vault
        values: tuple[str, ...] = (settings.management_token,)
        if settings.previous_management_token:
            values += (settings.previous_management_token,)
        return Tokens(values, "development token" if settings.using_dev_token else "environment")
    assert settings.key_vault_uri is not None  # token_source is "keyvault"
    client = secret_client(settings.key_vault_uri, settings)
    # A person waits here, not Smartcar: the first read also signs in (az, a browser), which
    # can take longer than the app's 5 s budget for a read.
    provider = KeyVaultTokenProvider(client, settings.token_secret_name, read_timeout=60.0)

    async def read() -> tuple[str, ...]:
        try:
            return tuple(await provider.get_tokens())
        finally:
            await provider.close()

    try:
        values = asyncio.run(read())
    except TokenUnavailableError as exc:
        raise TokenError(f"{exc}; pass --token, or check KEY_VAULT_URI and your access "
                         "(az login; the Key Vault Secrets User role)") from None
    return Tokens(values, f"Key Vault secret {settings.token_secret_name}")
