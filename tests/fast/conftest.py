"""The fast tier sends approvals as the relay does: sealed with the test key, which its
workers check (a worker refuses an unsealed approval, as in production)."""

import pytest
from temporalio.client import Client

from adapters.approval_seal import ApprovalKeys, sealing_client
from tests.harness import APPROVAL_KEYS


@pytest.fixture(scope="session")
def client(client: Client) -> Client:
    """The session's client, sealing every approval signal and update it sends."""
    return sealing_client(client, ApprovalKeys([APPROVAL_KEYS]))
