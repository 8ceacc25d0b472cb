"""The suite runs offline: the libraries read their offline switches at import time, and conftest sets them before
any import. A stray Hub id must fail at once, without opening a connection."""

from __future__ import annotations

import socket

import pytest


def test_the_libraries_are_in_offline_mode():
    import datasets
    import huggingface_hub.constants
    from transformers.utils.hub import is_offline_mode

    assert huggingface_hub.constants.HF_HUB_OFFLINE is True
    assert huggingface_hub.constants.is_offline_mode()
    assert datasets.config.HF_HUB_OFFLINE is True
    assert is_offline_mode()


def test_a_hub_id_fails_without_touching_the_network(monkeypatch):
    from transformers import AutoTokenizer

    attempts = []

    def no_network(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"test: network access to {address}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    with pytest.raises(OSError):
        AutoTokenizer.from_pretrained("openai-community/gpt2-rlhf-pipeline-offline-probe")
    assert attempts == []
