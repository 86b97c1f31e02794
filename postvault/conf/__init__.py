"""Server configuration: the schema of ``conf/postvault.toml`` as typed,
validated dataclasses, loading with environment overrides
(``POSTVAULT_<SECTION>_<KEY>``), and rendering of the commented default file."""

from postvault.conf.load import (
    ENV_NOT_CONFIG,
    load_config,
    load_config_text,
    render_default_config,
    show_config,
)
from postvault.conf.schema import (
    Config,
    Endpoint,
    ListenConfig,
    LogConfig,
    NotifyConfig,
    Relay,
    StoreConfig,
    TLSConfig,
)

__all__ = [
    "ENV_NOT_CONFIG",
    "Config",
    "Endpoint",
    "ListenConfig",
    "LogConfig",
    "NotifyConfig",
    "Relay",
    "StoreConfig",
    "TLSConfig",
    "load_config",
    "load_config_text",
    "render_default_config",
    "show_config",
]
