"""The outbound tests' fixtures (dev certificates for the sink), here too."""

from tests.outbound.conftest import certs  # noqa: F401
