"""Server configuration: the schema of ``conf/postvault.toml`` as typed,
validated dataclasses, loading with environment overrides
(``POSTVAULT_<SECTION>_<KEY>``), and rendering of the commented default file."""
